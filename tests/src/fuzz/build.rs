//! Frames from their parts, with lengths and checksums computed here (the
//! generator corrupts them afterwards when it wants them wrong).

use std::net::IpAddr;

use super::wire::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6, PROTO_ICMPV6};

/// An Ethernet frame around `payload`.
pub fn ethernet(dmac: [u8; 6], smac: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The IPv4 header fields a generator varies.
#[derive(Clone, Debug)]
pub struct V4 {
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, as the header holds them.
    pub frag: u16,
    pub ttl: u8,
    /// Option bytes, padded here to a multiple of 4.
    pub options: Vec<u8>,
}

impl Default for V4 {
    fn default() -> Self {
        Self {
            tos: 0,
            id: 0x1234,
            frag: 0x4000, // DF
            ttl: 64,
            options: Vec::new(),
        }
    }
}

/// An IPv4 packet (header checksum computed) carrying `l4`.
pub fn ipv4(src: IpAddr, dst: IpAddr, proto: u8, h: &V4, l4: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("ipv4() with IPv6 addresses");
    };
    let mut options = h.options.clone();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    options.truncate(40);
    let ihl = 5 + options.len() / 4;
    let mut ip = vec![0x40 | ihl as u8, h.tos];
    ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&h.id.to_be_bytes());
    ip.extend_from_slice(&h.frag.to_be_bytes());
    ip.push(h.ttl);
    ip.push(proto);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    ip.extend_from_slice(&options);
    let c = wire::checksum_of(wire::sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(l4);
    ip
}

/// An IPv6 packet: `first` is the Next Header of the fixed header (the
/// first extension header's type, or the upper layer's), `ext` the
/// extension headers' bytes, then `l4`.
pub fn ipv6(src: IpAddr, dst: IpAddr, first: u8, hop_limit: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("ipv6() with IPv4 addresses");
    };
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    ip.push(first);
    ip.push(hop_limit);
    ip.extend_from_slice(&s.octets());
    ip.extend_from_slice(&d.octets());
    ip.extend_from_slice(ext);
    ip.extend_from_slice(l4);
    ip
}

/// The TCP header fields a generator varies.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Option bytes, padded to a multiple of 4.
    pub options: Vec<u8>,
}

/// A TCP segment with its checksum over the pseudo-header of `src`, `dst`.
pub fn tcp(src: IpAddr, dst: IpAddr, h: &Tcp, payload: &[u8]) -> Vec<u8> {
    let mut options = h.options.clone();
    while !options.len().is_multiple_of(4) {
        options.push(1); // NOP
    }
    options.truncate(40);
    let doff = 5 + options.len() / 4;
    let mut t = Vec::with_capacity(doff * 4 + payload.len());
    t.extend_from_slice(&h.sport.to_be_bytes());
    t.extend_from_slice(&h.dport.to_be_bytes());
    t.extend_from_slice(&h.seq.to_be_bytes());
    t.extend_from_slice(&h.ack.to_be_bytes());
    t.push((doff as u8) << 4);
    t.push(h.flags);
    t.extend_from_slice(&h.window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    t.extend_from_slice(&options);
    t.extend_from_slice(payload);
    let c = wire::checksum_of(wire::pseudo_sum(src, dst, 6, t.len() as u32) + wire::sum(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A UDP datagram with its checksum (a computed zero sent as all ones).
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = wire::checksum_of(wire::pseudo_sum(src, dst, 17, u.len() as u32) + wire::sum(&u));
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP (IPv4: no pseudo-header) or ICMPv6 (pseudo-header of `src`,
/// `dst`) message: type, code, the four bytes after the checksum, body.
pub fn icmp(
    src: IpAddr,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let pseudo = if src.is_ipv6() {
        wire::pseudo_sum(src, dst, PROTO_ICMPV6, m.len() as u32)
    } else {
        0
    };
    let c = wire::checksum_of(pseudo + wire::sum(&m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The Ethernet type of an IP family.
pub fn ether_type(v6: bool) -> u16 {
    if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::wire::{parse, sum, verifies};

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        let (c, v): (IpAddr, IpAddr) = ("10.0.1.2".parse().unwrap(), "10.100.0.1".parse().unwrap());
        let h = Tcp {
            sport: 40000,
            dport: 80,
            seq: 1,
            ack: 0,
            flags: 0x02,
            window: 1000,
            options: vec![2, 4, 5, 0xb4],
        };
        let seg = tcp(c, v, &h, b"abc");
        let ip = ipv4(c, v, 6, &V4::default(), &seg);
        let f = ethernet([2; 6], [4; 6], ETHERTYPE_IPV4, &ip);
        let view = parse(&f).unwrap();
        assert_eq!((view.src, view.dst, view.proto), (c, v, 6));
        assert_eq!(view.ports(&f), Some((40000, 80)));
        assert_eq!(view.ip_end, f.len());
        assert!(verifies(sum(&f[14..34])), "IPv4 header checksum");
        let pseudo = wire::pseudo_sum(c, v, 6, (f.len() - view.l4) as u32);
        assert!(verifies(pseudo + sum(&f[view.l4..])), "TCP checksum");
    }
}
