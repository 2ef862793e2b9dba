//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN, with checksums computed
//! from scratch here (never by the code under test).

use std::net::IpAddr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The sequence number `Pkt::tcp` gives a client's segments: a backend's
/// SYN-ACK or RST to its SYN acknowledges `CLIENT_SEQ + 1`.
pub const CLIENT_SEQ: u32 = 0x0102_0304;

#[derive(Clone, Debug)]
pub struct Pkt {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ttl: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// TCP options (a multiple of 4 bytes).
    pub tcp_options: Vec<u8>,
    /// IPv4 identification (which datagram a fragment belongs to).
    pub ip_id: u16,
    /// IPv4 flags+fragment offset field (host order).
    pub frag: u16,
    /// Send a UDP-over-IPv4 datagram without checksum (zero).
    pub udp_no_checksum: bool,
    /// An IPv6 hop-by-hop header before the transport header.
    pub ipv6_hop_by_hop: bool,
}

impl Pkt {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            smac: [0x02, 0, 0, 0, 0, 0xc1],
            dmac: [0x02, 0, 0, 0, 0, 0x01],
            vlan: None,
            src,
            dst,
            proto: 6,
            sport,
            dport,
            tcp_flags: flags,
            seq: CLIENT_SEQ,
            ack: 0x0506_0708,
            ttl: 64,
            payload: b"payload!".to_vec(),
            ip_options: Vec::new(),
            tcp_options: Vec::new(),
            ip_id: 0x1234,
            frag: 0,
            udp_no_checksum: false,
            ipv6_hop_by_hop: false,
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    fn l4(&self, pseudo_src: &[u8], pseudo_dst: &[u8]) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let check_at;
        if self.proto == 6 {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.push(((5 + self.tcp_options.len() / 4) as u8) << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            check_at = l4.len();
            l4.extend_from_slice(&[0, 0, 0, 0]); // check, urg
            l4.extend_from_slice(&self.tcp_options);
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            check_at = l4.len();
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        if !(self.proto == 17 && self.udp_no_checksum) {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(pseudo_src);
            pseudo.extend_from_slice(pseudo_dst);
            if pseudo_src.len() == 4 {
                pseudo.extend_from_slice(&[0, self.proto]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            } else {
                pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, self.proto]);
            }
            pseudo.extend_from_slice(&l4);
            let mut c = checksum(&pseudo);
            if c == 0 && self.proto == 17 {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dmac);
        f.extend_from_slice(&self.smac);
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let l4 = self.l4(&s.octets(), &d.octets());
                let ihl = 5 + self.ip_options.len() / 4;
                let mut ip = vec![(4 << 4) | ihl as u8, 0];
                ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&self.ip_id.to_be_bytes());
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.push(self.ttl);
                ip.push(self.proto);
                ip.extend_from_slice(&[0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ip_options);
                let c = checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&ip);
                f.extend_from_slice(&l4);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let l4 = self.l4(&s.octets(), &d.octets());
                let ext_len = if self.ipv6_hop_by_hop { 8 } else { 0 };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((l4.len() + ext_len) as u16).to_be_bytes());
                f.push(if self.ipv6_hop_by_hop { 0 } else { self.proto });
                f.push(self.ttl);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.ipv6_hop_by_hop {
                    // next header, length 0 (8 bytes), PadN option.
                    f.extend_from_slice(&[self.proto, 0, 1, 4, 0, 0, 0, 0]);
                }
                f.extend_from_slice(&l4);
            }
            _ => panic!("mixed address families"),
        }
        f
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP (IPv4) or ICMPv6 destination-unreachable frame from `src` to
/// `dst` with `code`, quoting the first 28 (IPv4) or 48 (IPv6) bytes of the
/// IP packet in `quoted` (a frame as built by `Pkt::bytes`), as a router or
/// host sends it. Checksums computed here.
pub fn icmp_unreachable(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let inner = &quoted[14..(14 + 28).min(quoted.len())];
            let mut icmp = vec![3, code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(inner);
            let c = checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&icmp);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let inner = &quoted[14..(14 + 48).min(quoted.len())];
            let mut icmp = vec![1, code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(inner);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(&icmp);
            let c = checksum(&pseudo);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[58, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(&icmp);
        }
        _ => panic!("mixed address families"),
    }
    f
}
