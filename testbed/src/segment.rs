//! One L2 segment: client, load balancer and backends as ports of one
//! bridge, the topology of direct server return. The client reaches the VIP
//! through the LB (its route says so); each backend has the VIP on its
//! loopback, as a DSR backend must, and answers the client directly across
//! the segment, never through the LB.
//!
//! Devices are as the kernel makes them; nothing is tuned for Sluice. The
//! bridge lives in a namespace of its own, so the host sees none of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::{Family, Netns, link_pair, unique, wait_for_dad};

/// Addresses on the segment for one family.
impl Family {
    /// The client's address on the segment.
    pub fn segment_client(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 90, 0, 1).into(),
            Family::V6 => "fd90::1".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    /// The LB's address on the segment (the client's route to the VIP).
    pub fn segment_lb(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 90, 0, 2).into(),
            Family::V6 => "fd90::2".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    /// Backend i's address on the segment.
    pub fn segment_backend(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 90, 0, 10 + i as u8).into(),
            Family::V6 => format!("fd90::{:x}", 0x10 + i)
                .parse::<Ipv6Addr>()
                .unwrap()
                .into(),
        }
    }
    /// The VIP: on no device of the LB, on every backend's loopback.
    pub fn segment_vip(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 91, 0, 1).into(),
            Family::V6 => "fd91::1".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    fn segment_prefix(self) -> &'static str {
        match self {
            Family::V4 => "/24",
            Family::V6 => "/64",
        }
    }
}

/// client, lb and backend i on bridge `br0` (in namespace `switch`), each
/// through its own `eth0`, IPv4 and IPv6.
pub struct Segment {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// Dropped last: the bridge and the switch side of every veth.
    pub switch: Netns,
}

impl Segment {
    pub fn new(prefix: &str, backends: usize) -> Result<Self> {
        let base = unique(prefix);
        let switch = Netns::new(&format!("{base}s"))?;
        let client = Netns::new(&format!("{base}c"))?;
        let lb = Netns::new(&format!("{base}l"))?;
        let mut seg = Segment {
            client,
            lb,
            backends: Vec::new(),
            switch,
        };
        for i in 0..backends {
            seg.backends.push(Netns::new(&format!("{base}b{i}"))?);
        }
        seg.wire()?;
        Ok(seg)
    }

    fn wire(&self) -> Result<()> {
        let sw = &self.switch;
        sw.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        sw.exec(&["ip", "link", "set", "br0", "up"])?;
        self.port(&self.client, "pc", |f| f.segment_client())?;
        self.port(&self.lb, "pl", |f| f.segment_lb())?;
        for (i, b) in self.backends.iter().enumerate() {
            self.port(b, &format!("pb{i}"), |f| f.segment_backend(i))?;
            // The documented DSR backend setup: the VIP on the loopback, so
            // that the backend accepts packets to it and answers from it.
            for fam in [Family::V4, Family::V6] {
                let vip = format!(
                    "{}{}",
                    fam.segment_vip(),
                    if fam == Family::V4 { "/32" } else { "/128" }
                );
                b.exec(&["ip", "addr", "add", &vip, "dev", "lo"])?;
            }
        }
        // The client reaches the VIP through the LB.
        for fam in [Family::V4, Family::V6] {
            let vip = fam.segment_vip().to_string();
            let via = fam.segment_lb().to_string();
            let flag = if fam == Family::V4 { "-4" } else { "-6" };
            self.client
                .exec(&["ip", flag, "route", "add", &vip, "via", &via])?;
        }
        for ns in [&self.client, &self.lb].into_iter().chain(&self.backends) {
            wait_for_dad(ns)?;
        }
        Ok(())
    }

    /// `ns`'s `eth0`, its peer `port` on the bridge, and `ns`'s addresses.
    fn port(&self, ns: &Netns, port: &str, address: impl Fn(Family) -> IpAddr) -> Result<()> {
        link_pair(&ns.name, "eth0", &self.switch.name, port)?;
        self.switch
            .exec(&["ip", "link", "set", port, "master", "br0"])?;
        self.switch.exec(&["ip", "link", "set", port, "up"])?;
        for fam in [Family::V4, Family::V6] {
            let cidr = format!("{}{}", address(fam), fam.segment_prefix());
            let mut args = vec!["ip", "addr", "add", cidr.as_str(), "dev", "eth0"];
            if fam == Family::V6 {
                args.push("nodad");
            }
            ns.exec(&args)?;
        }
        ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Resolves the LB's neighbours (the backends) and the client's (the LB),
    /// so the first packets take the fast path, as `Topology::warm_neighbours`.
    pub fn warm_neighbours(&self) -> Result<()> {
        for fam in [Family::V4, Family::V6] {
            for i in 0..self.backends.len() {
                let t = fam.segment_backend(i).to_string();
                self.lb.exec(&["ping", "-c1", "-W1", "-q", &t])?;
            }
            let lb = fam.segment_lb().to_string();
            self.client.exec(&["ping", "-c1", "-W1", "-q", &lb])?;
        }
        Ok(())
    }
}
