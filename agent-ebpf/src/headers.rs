//! Views of the L3/L4 headers with natural-width fields.
//!
//! network-types declares multi-byte fields as byte arrays (alignment 1), which
//! the BPF backend turns into one load per byte. These views let an address be
//! one 32-bit load; x86-64 and arm64 kernels allow unaligned packet access.

#[repr(C)]
pub struct Ipv4 {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    /// TTL and protocol, read together because they share a checksum word.
    pub ttl_proto: u16,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
pub struct Ipv6 {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// The first four bytes of TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

pub const TCP_HDR_LEN: usize = 20;
pub const TCP_SEQ_OFFSET: usize = 4;
pub const TCP_CHECK_OFFSET: usize = 16;
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const UDP_HDR_LEN: usize = 8;
pub const UDP_CHECK_OFFSET: usize = 6;

/// IPv4 "more fragments" flag and fragment offset, in network byte order.
pub const IPV4_FRAG_MASK_BE: u16 = 0x3fffu16.to_be();
/// IPv4 fragment offset alone, in network byte order.
pub const IPV4_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();

/// IPv6 hop-by-hop, routing and destination options headers: a next header
/// and a length in 8-byte units (not counting the first 8), then options.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_DEST_OPTS: u8 = 60;

/// The IPv6 fragment header.
#[repr(C)]
pub struct Ipv6Fragment {
    pub next_hdr: u8,
    pub reserved: u8,
    /// Offset in 8-byte units (13 bits), then 2 reserved bits and M.
    pub offset_m: u16,
    pub id: u32,
}

/// IPv6 next-header values that are extension headers (not parsed here).
#[inline(always)]
pub fn is_ipv6_extension(next_hdr: u8) -> bool {
    matches!(
        next_hdr,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}
pub const IPV6_FRAGMENT: u8 = 44;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// Type, code, checksum and 4 bytes before an ICMP error's quoted packet.
pub const ICMP_HDR_LEN: usize = 8;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
/// Code of ICMP destination-unreachable: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Offset of the checksum in an ICMP or ICMPv6 header.
pub const ICMP_CHECK_OFFSET: usize = 2;
