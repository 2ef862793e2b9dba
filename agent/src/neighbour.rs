//! Direct server return forwards a packet that still has the VIP as its
//! destination: when the LB has no neighbour entry for the backend yet,
//! the kernel can't be handed the packet to resolve it (it would route it
//! by the VIP), so the datapath drops it (`dsr_no_neighbour`). The agent
//! has the kernel resolve the backends of DSR services instead: when such
//! a backend is added, and again whenever such drops were counted.
//!
//! A zero-length UDP datagram to the backend's discard port (9) is what
//! makes the kernel resolve a neighbour without special privileges or
//! netlink plumbing; the backend ignores it (or answers "port
//! unreachable").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use tracing::debug;

const DISCARD_PORT: u16 = 9;

/// Has the kernel resolve `ip`'s link-layer address (ARP or NDP).
pub fn solicit(ip: IpAddr) {
    let any: IpAddr = if ip.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let sent = UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| s.send_to(&[], SocketAddr::new(ip, DISCARD_PORT)));
    if let Err(e) = sent {
        debug!(backend = %ip, error = %e, "neighbour solicitation for a DSR backend not sent");
    }
}
