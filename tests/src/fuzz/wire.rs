//! The oracle's own reading of frames and its own checksum arithmetic,
//! written from the RFCs (791, 8200, 768, 793, 792, 4443, 1071) and sharing
//! nothing with the datapath's parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const AH: u8 = 51;
pub const DEST_OPTS: u8 = 60;

/// Sum of big-endian 16-bit words (an odd last byte is the high byte of a
/// word), not yet folded: RFC 1071's running sum.
pub fn sum(data: &[u8]) -> u64 {
    let mut s: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u64::from(*last) << 8;
    }
    s
}

/// A running sum reduced modulo 0xffff: one's complement arithmetic in
/// which 0x0000 and 0xffff are the same number.
pub fn modulo(s: u64) -> u64 {
    s % 0xffff
}

/// The checksum to store for data whose running sum is `s`.
pub fn checksum_of(s: u64) -> u16 {
    let mut s = s;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether data (its checksum field included) sums to "all ones".
pub fn verifies(s: u64) -> bool {
    modulo(s) == 0
}

/// The TCP/UDP/ICMPv6 pseudo-header's running sum.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: u32) -> u64 {
    let addr = |a: IpAddr| match a {
        IpAddr::V4(a) => sum(&a.octets()),
        IpAddr::V6(a) => sum(&a.octets()),
    };
    addr(src) + addr(dst) + u64::from(proto) + u64::from(len >> 16) + u64::from(len & 0xffff)
}

pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The address of `family` (4 or 6) at `at`, if the frame holds it.
pub fn addr_at(b: &[u8], at: usize, v6: bool) -> Option<IpAddr> {
    if v6 {
        let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(o)))
    } else {
        let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(o)))
    }
}

/// An IP packet as the oracle reads it: where things are, what they say.
#[derive(Clone, Debug)]
pub struct IpView {
    pub v6: bool,
    /// Offset of the IP header (after Ethernet).
    pub l3: usize,
    /// IPv4: ihl × 4 (possibly below 20: malformed); IPv6: 40.
    pub header_len: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Offset of the source and destination addresses.
    pub src_at: usize,
    pub dst_at: usize,
    pub ttl_at: usize,
    pub ttl: u8,
    /// Where the IP packet ends by its own length field.
    pub ip_end: usize,
    /// The upper-layer protocol (after IPv6 extension headers), and where
    /// its header starts.
    pub proto: u8,
    pub l4: usize,
    /// Part of a fragmented datagram (IPv4 MF or offset; IPv6 any fragment
    /// header that isn't atomic).
    pub fragment: bool,
    /// A fragment other than the first: no transport header in it.
    pub later_fragment: bool,
    /// IPv6: how many extension headers precede `l4`, and how many of them
    /// are fragment headers.
    pub extensions: usize,
    pub fragment_headers: usize,
}

impl IpView {
    /// The transport ports, when the packet carries them (not a later
    /// fragment, and the frame holds them).
    pub fn ports(&self, b: &[u8]) -> Option<(u16, u16)> {
        if self.later_fragment || !matches!(self.proto, 6 | 17) {
            return None;
        }
        Some((be16(b, self.l4)?, be16(b, self.l4 + 2)?))
    }

    /// The IPv4 header lies whole inside the frame (checksum computable).
    pub fn v4_header(&self, b: &[u8]) -> Option<std::ops::Range<usize>> {
        if self.v6 || self.header_len < 20 || self.l3 + self.header_len > b.len() {
            return None;
        }
        Some(self.l3..self.l3 + self.header_len)
    }

    /// Offset of the transport checksum field (TCP, UDP, ICMP, ICMPv6).
    pub fn l4_check_at(&self) -> Option<usize> {
        match self.proto {
            6 => Some(self.l4 + 16),
            17 => Some(self.l4 + 6),
            1 | 58 => Some(self.l4 + 2),
            _ => None,
        }
    }
}

/// Reads the Ethernet and IP headers of `b`; None for anything that isn't
/// untagged IPv4/IPv6 with at least its fixed header.
pub fn parse(b: &[u8]) -> Option<IpView> {
    parse_as(b, true)
}

/// As `parse`, taking the Ethernet type's word for the IP version (the
/// version field is not checked).
pub fn parse_lenient(b: &[u8]) -> Option<IpView> {
    parse_as(b, false)
}

fn parse_as(b: &[u8], strict: bool) -> Option<IpView> {
    let ether_type = be16(b, 12)?;
    match ether_type {
        ETHERTYPE_IPV4 => parse_v4(b, strict),
        ETHERTYPE_IPV6 => parse_v6(b, strict),
        _ => None,
    }
}

fn parse_v4(b: &[u8], strict: bool) -> Option<IpView> {
    let l3 = ETH_LEN;
    if b.len() < l3 + 20 || (strict && b[l3] >> 4 != 4) {
        return None;
    }
    let header_len = usize::from(b[l3] & 0x0f) * 4;
    let flags_offset = be16(b, l3 + 6)?;
    let offset = flags_offset & 0x1fff;
    let more = flags_offset & 0x2000 != 0;
    Some(IpView {
        v6: false,
        l3,
        header_len,
        src: addr_at(b, l3 + 12, false)?,
        dst: addr_at(b, l3 + 16, false)?,
        src_at: l3 + 12,
        dst_at: l3 + 16,
        ttl_at: l3 + 8,
        ttl: b[l3 + 8],
        ip_end: l3 + usize::from(be16(b, l3 + 2)?),
        proto: b[l3 + 9],
        l4: l3 + header_len,
        fragment: more || offset != 0,
        later_fragment: offset != 0,
        extensions: 0,
        fragment_headers: 0,
    })
}

fn parse_v6(b: &[u8], strict: bool) -> Option<IpView> {
    let l3 = ETH_LEN;
    if b.len() < l3 + 40 || (strict && b[l3] >> 4 != 6) {
        return None;
    }
    let mut next = b[l3 + 6];
    let mut at = l3 + 40;
    let (mut fragment, mut later, mut extensions, mut fragment_headers) = (false, false, 0, 0);
    // Every extension header the oracle knows, however many there are; an
    // extension header cut by the frame ends the walk there.
    loop {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let (Some(&n), Some(&len)) = (b.get(at), b.get(at + 1)) else {
                    break;
                };
                next = n;
                at += (usize::from(len) + 1) * 8;
            }
            AH => {
                let (Some(&n), Some(&len)) = (b.get(at), b.get(at + 1)) else {
                    break;
                };
                next = n;
                at += (usize::from(len) + 2) * 4;
            }
            FRAGMENT => {
                let (Some(&n), Some(field)) = (b.get(at), be16(b, at + 2)) else {
                    break;
                };
                let offset = field >> 3;
                let more = field & 1 != 0;
                if offset != 0 || more {
                    fragment = true;
                }
                if offset != 0 {
                    later = true;
                }
                fragment_headers += 1;
                next = n;
                at += 8;
            }
            _ => break,
        }
        extensions += 1;
    }
    Some(IpView {
        v6: true,
        l3,
        header_len: 40,
        src: addr_at(b, l3 + 8, true)?,
        dst: addr_at(b, l3 + 24, true)?,
        src_at: l3 + 8,
        dst_at: l3 + 24,
        ttl_at: l3 + 7,
        ttl: b[l3 + 7],
        ip_end: l3 + 40 + usize::from(be16(b, l3 + 4)?),
        proto: next,
        l4: at,
        fragment,
        later_fragment: later,
        extensions,
        fragment_headers,
    })
}

/// The IP version field of an IPv4 or IPv6 frame when it contradicts the
/// Ethernet type (which `parse` then refuses).
pub fn wrong_version(b: &[u8]) -> Option<(u8, u8)> {
    let expected = match be16(b, 12)? {
        ETHERTYPE_IPV4 => 4,
        ETHERTYPE_IPV6 => 6,
        _ => return None,
    };
    let got = b.get(ETH_LEN)? >> 4;
    (got != expected).then_some((expected, got))
}

/// The quoted packet inside an ICMP or ICMPv6 error (RFC 792, 4443): its
/// IP header eight bytes into the message.
#[derive(Clone, Debug)]
pub struct Quote {
    pub at: usize,
    pub v6: bool,
    pub header_len: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: usize,
}

impl Quote {
    pub fn ports(&self, b: &[u8]) -> Option<(u16, u16)> {
        Some((be16(b, self.l4)?, be16(b, self.l4 + 2)?))
    }
}

pub fn quote(b: &[u8], outer: &IpView) -> Option<Quote> {
    let at = outer.l4 + 8;
    if outer.v6 {
        if b.len() < at + 40 {
            return None;
        }
        Some(Quote {
            at,
            v6: true,
            header_len: 40,
            src: addr_at(b, at + 8, true)?,
            dst: addr_at(b, at + 24, true)?,
            proto: b[at + 6],
            l4: at + 40,
        })
    } else {
        if b.len() < at + 20 {
            return None;
        }
        let header_len = usize::from(b[at] & 0x0f) * 4;
        Some(Quote {
            at,
            v6: false,
            header_len,
            src: addr_at(b, at + 12, false)?,
            dst: addr_at(b, at + 16, false)?,
            proto: b[at + 9],
            l4: at + header_len,
        })
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !text.len().is_multiple_of(2) {
        return Err(format!("{} hex digits: an odd number", text.len()));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| format!("{:?} at {i} is not a hex byte", &text[i..i + 2]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_the_rfc_1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum_of(sum(&data)), !0xddf2);
        let mut with = data.to_vec();
        with.extend_from_slice(&checksum_of(sum(&data)).to_be_bytes());
        assert!(verifies(sum(&with)));
    }

    #[test]
    fn zero_and_all_ones_are_one_number() {
        assert_eq!(modulo(0xffff), modulo(0));
        assert!(verifies(0xffff));
        assert!(!verifies(0xfffe));
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(unhex(&hex(&[0, 0xab, 0xff])).unwrap(), vec![0, 0xab, 0xff]);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}
