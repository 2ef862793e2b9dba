//! The fuzzed datapath's surroundings, as plain data: the services written
//! into its maps, the hosts around it and the interfaces they sit behind.
//! The config given to the datapath is generated from this table, and the
//! oracle judges outputs against the same table (what was configured),
//! never against anything the datapath computes.

use std::net::{IpAddr, SocketAddr};

use crate::fib::{CLIENT_MAC, T0_MAC, T1_MAC, backend_mac};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Which of the LB's two interfaces a host sits behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `t0`: the backends (and the SNAT addresses).
    Backends,
    /// `t1`: the clients.
    Clients,
}

impl Side {
    pub fn device(self) -> &'static str {
        match self {
            Side::Backends => "t0",
            Side::Clients => "t1",
        }
    }
    pub fn mac(self) -> [u8; 6] {
        match self {
            Side::Backends => T0_MAC,
            Side::Clients => T1_MAC,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// `Some(snat_ip)` for `forwarding: snat`.
    pub snat: Option<IpAddr>,
    /// `forwarding: dsr` (L2): the packet keeps its addresses and ports,
    /// only its MACs (towards a backend) and TTL change.
    pub dsr: bool,
    /// Address and weight (0: drained, never chosen for a new flow).
    pub backends: Vec<(SocketAddr, u32)>,
}

impl Service {
    pub fn has_backend(&self, addr: &SocketAddr) -> bool {
        self.backends.iter().any(|(a, _)| a == addr)
    }
    pub fn has_backend_ip(&self, ip: IpAddr) -> bool {
        self.backends.iter().any(|(a, _)| a.ip() == ip)
    }
    pub fn weight_of(&self, addr: &SocketAddr) -> Option<u32> {
        self.backends
            .iter()
            .find(|(a, _)| a == addr)
            .map(|(_, w)| *w)
    }
}

/// A host the LB's namespace has a permanent neighbour entry for.
#[derive(Clone, Copy, Debug)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub side: Side,
}

pub struct World {
    pub services: Vec<Service>,
    pub neighbours: Vec<Neighbour>,
    /// Client addresses the generator sends from: with a neighbour entry,
    /// on the clients' subnet without one (the FIB says "no neighbour"),
    /// and outside any route (the FIB says "no route").
    pub clients_v4: Vec<IpAddr>,
    pub clients_v6: Vec<IpAddr>,
    /// Routers on the backends' side that may send ICMP errors.
    pub routers: Vec<IpAddr>,
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a literal address")
}

fn sa(text: &str) -> SocketAddr {
    text.parse().expect("a literal socket address")
}

/// MAC of client neighbour `k` (k = 0 is the test bed's CLIENT_MAC).
fn client_mac(k: usize) -> [u8; 6] {
    if k == 0 {
        CLIENT_MAC
    } else {
        [0x02, 0, 0, 0, 0x01, k as u8]
    }
}

impl World {
    /// IPv4 and IPv6, TCP and UDP, dnat, snat and (L2) dsr, a backend
    /// shared by several services (on several VIPs and ports), and a
    /// drained backend. Ten services (the test bed's maps hold 16).
    pub fn standard() -> Self {
        let services = vec![
            Service {
                name: "web4",
                vip: ip("10.100.0.1"),
                port: 80,
                proto: TCP,
                snat: None,
                dsr: false,
                backends: vec![
                    (sa("10.1.0.2:8080"), 1),
                    (sa("10.1.1.2:8080"), 2),
                    (sa("10.1.2.2:8080"), 1),
                    (sa("10.1.3.2:8080"), 0),
                ],
            },
            Service {
                name: "dns4",
                vip: ip("10.100.0.1"),
                port: 53,
                proto: UDP,
                snat: None,
                dsr: false,
                backends: vec![(sa("10.1.0.2:5353"), 1), (sa("10.1.1.2:5353"), 1)],
            },
            Service {
                name: "alt4",
                vip: ip("10.100.0.2"),
                port: 80,
                proto: TCP,
                snat: None,
                dsr: false,
                backends: vec![(sa("10.1.0.2:8080"), 1)],
            },
            Service {
                name: "snat4-tcp",
                vip: ip("10.100.0.3"),
                port: 443,
                proto: TCP,
                snat: Some(ip("10.1.0.1")),
                dsr: false,
                backends: vec![(sa("10.1.1.2:8443"), 1), (sa("10.1.2.2:8443"), 1)],
            },
            Service {
                name: "snat4-udp",
                vip: ip("10.100.0.3"),
                port: 443,
                proto: UDP,
                snat: Some(ip("10.1.0.1")),
                dsr: false,
                backends: vec![(sa("10.1.2.2:8443"), 1), (sa("10.1.3.2:8443"), 0)],
            },
            Service {
                name: "web6",
                vip: ip("fd64::1"),
                port: 80,
                proto: TCP,
                snat: None,
                dsr: false,
                backends: vec![
                    (sa("[fd01:0::2]:8080"), 1),
                    (sa("[fd01:1::2]:8080"), 1),
                    (sa("[fd01:3::2]:8080"), 0),
                ],
            },
            Service {
                name: "dns6-snat",
                vip: ip("fd64::1"),
                port: 53,
                proto: UDP,
                snat: Some(ip("fd01::1")),
                dsr: false,
                backends: vec![(sa("[fd01:1::2]:5353"), 1), (sa("[fd01:2::2]:5353"), 1)],
            },
            Service {
                name: "snat6-tcp",
                vip: ip("fd64::2"),
                port: 443,
                proto: TCP,
                snat: Some(ip("fd01::1")),
                dsr: false,
                backends: vec![(sa("[fd01:2::2]:8443"), 1)],
            },
            Service {
                name: "dsr4",
                vip: ip("10.100.0.4"),
                port: 80,
                proto: TCP,
                snat: None,
                dsr: true,
                backends: vec![
                    (sa("10.1.0.2:80"), 1),
                    (sa("10.1.1.2:80"), 1),
                    (sa("10.1.3.2:80"), 0),
                ],
            },
            Service {
                name: "dsr6-udp",
                vip: ip("fd64::4"),
                port: 53,
                proto: UDP,
                snat: None,
                dsr: true,
                backends: vec![(sa("[fd01:0::2]:53"), 1), (sa("[fd01:2::2]:53"), 1)],
            },
        ];
        let mut neighbours = Vec::new();
        for i in 0..4 {
            for family_ip in [format!("10.1.{i}.2"), format!("fd01:{i}::2")] {
                neighbours.push(Neighbour {
                    ip: ip(&family_ip),
                    mac: backend_mac(i),
                    side: Side::Backends,
                });
            }
        }
        for k in 0..5 {
            for family_ip in [format!("10.0.1.{}", k + 2), format!("fd00:1::{}", k + 2)] {
                neighbours.push(Neighbour {
                    ip: ip(&family_ip),
                    mac: client_mac(k),
                    side: Side::Clients,
                });
            }
        }
        let clients_v4 = (2..7)
            .map(|d| ip(&format!("10.0.1.{d}")))
            .chain([ip("10.0.1.77"), ip("192.0.2.10")])
            .collect();
        let clients_v6 = (2..7)
            .map(|d| ip(&format!("fd00:1::{d}")))
            .chain([ip("fd00:1::77"), ip("2001:db8::10")])
            .collect();
        Self {
            services,
            neighbours,
            clients_v4,
            clients_v6,
            routers: vec![ip("10.1.200.1"), ip("fd01:200::1")],
        }
    }

    /// The `services:` part of the agent's config.
    pub fn services_yaml(&self) -> String {
        let mut text = String::from("services:\n");
        for s in &self.services {
            let proto = if s.proto == TCP { "tcp" } else { "udp" };
            text += &format!(
                "  - name: {}\n    vip: \"{}\"\n    port: {}\n    protocol: {proto}\n",
                s.name, s.vip, s.port
            );
            if let Some(snat) = s.snat {
                text += &format!("    forwarding: snat\n    snat_ip: \"{snat}\"\n");
            }
            if s.dsr {
                text += "    forwarding: dsr\n";
            }
            text += "    backends:\n";
            for (addr, weight) in &s.backends {
                text += &format!("      - address: \"{addr}\"\n        weight: {weight}\n");
            }
        }
        text
    }

    pub fn neighbour(&self, ip: IpAddr) -> Option<&Neighbour> {
        self.neighbours.iter().find(|n| n.ip == ip)
    }

    /// The address of the neighbour whose MAC is `mac`, in the family
    /// `v6` says (a backend's MAC serves both of its addresses).
    pub fn neighbour_by_mac(&self, mac: &[u8], v6: bool) -> Option<IpAddr> {
        self.neighbours
            .iter()
            .find(|n| n.mac == mac && n.ip.is_ipv6() == v6)
            .map(|n| n.ip)
    }

    /// Services at `(vip, port, proto)`; `port` None: any port (a later
    /// fragment, whose ports aren't in it).
    pub fn services_at(
        &self,
        vip: IpAddr,
        port: Option<u16>,
        proto: u8,
    ) -> impl Iterator<Item = &Service> {
        self.services
            .iter()
            .filter(move |s| s.vip == vip && s.proto == proto && port.is_none_or(|p| p == s.port))
    }

    /// Services that have `backend` (`port` None: any of its ports).
    pub fn services_of_backend(
        &self,
        backend: IpAddr,
        port: Option<u16>,
        proto: u8,
    ) -> impl Iterator<Item = &Service> {
        self.services.iter().filter(move |s| {
            s.proto == proto
                && match port {
                    Some(p) => s.has_backend(&SocketAddr::new(backend, p)),
                    None => s.has_backend_ip(backend),
                }
        })
    }
}
