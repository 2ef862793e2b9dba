//! What the Kubernetes provider takes from the cluster. Anyone who can
//! create a Service in some namespace can label it and name any
//! externalIP (CVE-2020-8554), and anyone who can write an EndpointSlice can
//! name any endpoint address; so:
//!
//! - only Services in `kubernetes.namespaces` count (when it is set);
//! - no VIP is of a refused class (loopback, link-local, multicast, …:
//!   `config::refused_class`), whatever its kind;
//! - an externalIP or load-balancer ingress IP is never this node's own
//!   address nor the API server's, and is inside `kubernetes.external_cidrs`
//!   when that is set;
//! - each endpoint passes the config's backend check (`config::backend`).
//!
//! What is refused is skipped on its own (the rest of the Service is
//! taken) and reported as a `Skipped` that the provider logs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::config::{Cidr, Kubernetes, refused_class};

/// kube-proxy's IPVS mode puts every Service address on this dummy device:
/// those are the Services', not the node's.
const KUBE_IPVS_DEVICE: &str = "kube-ipvs0";

/// Something of a Service that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `NAMESPACE/NAME` of the Service.
    pub service: String,
    /// What was skipped (`externalIP 192.0.2.7`, `endpoint 127.0.0.1:80`, …).
    pub what: String,
    pub why: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.service, self.what, self.why)
    }
}

/// The provider's rules, from the config and what this node knows.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    namespaces: Option<BTreeSet<String>>,
    external_cidrs: Option<Vec<Cidr>>,
    /// Addresses no Service may claim as an external VIP, with whose they are.
    reserved: BTreeMap<IpAddr, String>,
}

impl Trust {
    /// The config's rules; `api_server`: the addresses the API server is
    /// reached at. This node's addresses come with `set_host_addresses`.
    pub fn new(spec: &Kubernetes, api_server: &[IpAddr]) -> Self {
        let mut reserved = BTreeMap::new();
        for ip in api_server {
            reserved.insert(*ip, "the API server's address".to_string());
        }
        Self {
            namespaces: spec
                .allowed_namespaces()
                .map(|list| list.into_iter().collect()),
            // Checked by the config's validation: what doesn't parse can't be here.
            external_cidrs: spec
                .external_cidrs
                .as_ref()
                .map(|list| list.iter().filter_map(|c| Cidr::parse(c).ok()).collect()),
            reserved,
        }
    }

    /// This node's own addresses as (device, address), replacing the last.
    pub fn set_host_addresses(&mut self, addresses: &[(String, IpAddr)]) {
        self.reserved
            .retain(|_, whose| !whose.starts_with("this node's"));
        for (device, ip) in addresses {
            if device != KUBE_IPVS_DEVICE {
                self.reserved
                    .entry(*ip)
                    .or_insert_with(|| format!("this node's address (on {device})"));
            }
        }
    }

    /// Whether Services of namespace `ns` may opt in.
    pub fn namespace_allowed(&self, ns: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|list| list.contains(ns))
    }

    /// Why `ip` can't be a VIP; None when it can. `external`: an externalIP
    /// or a load-balancer ingress IP (which a Service sets itself), not an
    /// allocated ClusterIP.
    pub fn refuse_vip(&self, ip: IpAddr, external: bool) -> Option<String> {
        if let Some(class) = refused_class(ip) {
            return Some(format!("{class} can't be a VIP"));
        }
        if !external {
            return None;
        }
        if let Some(whose) = self.reserved.get(&ip) {
            return Some(format!("{whose} can't be a VIP"));
        }
        match &self.external_cidrs {
            Some(cidrs) if !cidrs.iter().any(|c| c.contains(ip)) => {
                Some("not inside kubernetes.external_cidrs".to_string())
            }
            _ => None,
        }
    }
}

/// Every address of this host's interfaces, as (device, address).
pub fn host_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates; it is freed
    // once, below, after the last read of it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is an element of the list getifaddrs made, valid
        // until freeifaddrs.
        let ifa = unsafe { &*node };
        node = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string of the list.
        let device = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family field says
        // which sockaddr it is; each is read as that type only.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        out.push((device, ip));
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The addresses the API server at `url` is reached at (an address, or a
/// name resolved now; nothing when it can't be).
pub async fn api_server_addresses(url: &hyper::Uri) -> Vec<IpAddr> {
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip];
    }
    let port = url.port_u16().unwrap_or(443);
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(yaml: &str) -> Trust {
        let spec: Kubernetes = serde_saphyr::from_str(yaml).unwrap();
        let mut t = Trust::new(&spec, &["10.0.0.10".parse().unwrap()]);
        t.set_host_addresses(&[
            ("eth0".into(), "10.0.1.1".parse().unwrap()),
            (KUBE_IPVS_DEVICE.into(), "192.0.2.9".parse().unwrap()),
        ]);
        t
    }

    fn refused(t: &Trust, ip: &str, external: bool) -> Option<String> {
        t.refuse_vip(ip.parse().unwrap(), external)
    }

    #[test]
    fn external_vips_are_never_the_nodes_the_api_servers_or_metadata() {
        let open = trust("addresses: [external_ips]");
        assert_eq!(refused(&open, "192.0.2.7", true), None);
        // kube-ipvs0 holds Service addresses, not the node's.
        assert_eq!(refused(&open, "192.0.2.9", true), None);
        assert_eq!(
            refused(&open, "10.0.1.1", true).unwrap(),
            "this node's address (on eth0) can't be a VIP"
        );
        assert_eq!(
            refused(&open, "10.0.0.10", true).unwrap(),
            "the API server's address can't be a VIP"
        );
        assert_eq!(
            refused(&open, "169.254.169.254", true).unwrap(),
            "a cloud metadata address can't be a VIP"
        );
        assert_eq!(
            refused(&open, "fd00:ec2::254", true).unwrap(),
            "a cloud metadata address can't be a VIP"
        );
        // Allocated ClusterIPs: only the class rule.
        assert_eq!(refused(&open, "10.0.1.1", false), None);
        assert!(refused(&open, "127.0.0.1", false).is_some());

        let listed = trust("addresses: [external_ips]\nexternal_cidrs: [192.0.2.0/24, 10.0.0.0/8]");
        assert_eq!(refused(&listed, "192.0.2.7", true), None);
        assert_eq!(
            refused(&listed, "198.51.100.1", true).unwrap(),
            "not inside kubernetes.external_cidrs"
        );
        // Inside a listed block, still never the node's nor the API server's.
        assert!(refused(&listed, "10.0.1.1", true).is_some());
        assert!(refused(&listed, "10.0.0.10", true).is_some());
    }

    #[test]
    fn namespaces_default_to_all() {
        assert!(trust("{}").namespace_allowed("anything"));
        let t = trust("namespaces: [shop, web]");
        assert!(t.namespace_allowed("shop") && !t.namespace_allowed("tenant"));
        assert!(trust("namespace: shop").namespace_allowed("shop"));
        assert!(!trust("namespace: shop").namespace_allowed("web"));
    }

    #[test]
    fn host_addresses_include_loopback() {
        // Every Linux network namespace has lo with 127.0.0.1.
        assert!(
            host_addresses()
                .iter()
                .any(|(d, ip)| d == "lo" && *ip == IpAddr::from([127, 0, 0, 1]))
        );
    }
}
