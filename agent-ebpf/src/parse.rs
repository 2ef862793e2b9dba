//! Stage 1: the headers. Ethernet, IPv4 (options skipped) or IPv6 (with its
//! extension headers), fragments, then the TCP/UDP ports; ICMP errors are
//! handed to `icmp`. Nothing here decides what the packet is for.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use core::mem;

use agent_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, reason};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    headers::{
        IPV4_FRAG_MASK_BE, IPV4_OFFSET_MASK_BE, IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP,
        IPV6_ROUTING, Ipv4, Ipv6, Ipv6Fragment, PROTO_ICMP, PROTO_ICMPV6, Ports, TCP_FLAGS_OFFSET,
        TCP_HDR_LEN, TCP_SEQ_OFFSET, UDP_HDR_LEN, is_ipv6_extension,
    },
    maps::{FRAGMENTS, scratch},
    packet::{Action, Ctx, ETH_LEN, Packet, Scratch, copy_addr, fragment, ptr_at},
    stats::exception,
};

/// Extension headers parsed in front of an IPv6 packet's TCP/UDP header.
const MAX_IPV6_EXTENSIONS: u32 = 4;

/// The largest L4 offset the pipeline reads at (a mask: see `settle`).
const MAX_L4_OFFSET: usize = 0x1ff;

/// Where a parsed packet goes next: the pipeline implements it. Each way
/// through the headers calls it where it ends (not through a returned
/// value), so each is compiled with its own constants, as one function.
pub trait Next {
    /// TCP or UDP over IP, with the 5-tuple's addresses; the ports come
    /// next (`ports`), and the scratch area holds the rest of the work.
    fn transport(
        &self,
        ctx: &Ctx,
        s: &mut Scratch,
        pkt: &Packet,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> Action;
    /// An ICMP or ICMPv6 message, its header at `l4`.
    fn icmp(&self, ctx: &Ctx, l4: usize, family: u8) -> Action;
    /// IP that can't be parsed exactly (`code`): passed, maybe counted.
    fn unhandled(&self, src: &[u32; 4], dst: &[u32; 4], code: u32) -> Action;
}

/// Reads the Ethernet and IP headers.
#[inline(always)]
pub fn parse(ctx: &Ctx, stages: &impl Next) -> Action {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return exception(reason::SHORT_FRAME);
    };
    // SAFETY: ptr_at checked the header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    let parsed = if ether_type == EtherType::Ipv4 as u16 {
        ipv4(ctx, stages)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(ctx, stages)
    } else if ether_type == EtherType::Ieee8021q as u16
        || ether_type == EtherType::Ieee8021ad as u16
    {
        return exception(reason::VLAN_TAGGED);
    } else {
        return Action::Pass;
    };
    // One call for both families (their parse results settled, see
    // `settle`): the verifier walks the rest of the pipeline once.
    match parsed {
        Ok(p) => stages.transport(ctx, p.s, &p.pkt, &p.src, &p.dst),
        Err(action) => action,
    }
}

/// TCP or UDP over IP, parsed: what `Next::transport` works on.
struct Parsed {
    s: &'static mut Scratch,
    pkt: Packet,
    src: [u32; 4],
    dst: [u32; 4],
}

/// Passes the parse result (L4 offset, fragment kind, identification,
/// family) through the scratch area. Each way through the headers (IPv4 fragment or
/// not, each number of IPv6 extension headers) leaves different constants in
/// the verifier's state, and the rest of the pipeline, far larger than the
/// parsing, would be verified once for each; read back from memory they are
/// one unknown, so it is verified once.
///
/// Returns the scratch area too: the rest of the pipeline works in it.
#[inline(always)]
fn settle(
    l4: usize,
    fragment: u8,
    id: u32,
    family: u8,
) -> Option<(&'static mut Scratch, usize, u8, u32, u8)> {
    let s = scratch()?;
    let p = &raw mut s.parsed;
    // SAFETY: this CPU's scratch slot (see `Scratch`); volatile, so the
    // values really go through memory.
    unsafe {
        core::ptr::write_volatile(&raw mut (*p)[0], l4 as u32);
        core::ptr::write_volatile(&raw mut (*p)[1], u32::from(fragment));
        core::ptr::write_volatile(&raw mut (*p)[2], id);
        core::ptr::write_volatile(&raw mut (*p)[3], u32::from(family));
        let settled = (
            core::ptr::read_volatile(&raw const (*p)[0]) as usize & MAX_L4_OFFSET,
            (core::ptr::read_volatile(&raw const (*p)[1]) & 3) as u8,
            core::ptr::read_volatile(&raw const (*p)[2]),
            core::ptr::read_volatile(&raw const (*p)[3]) as u8,
        );
        Some((s, settled.0, settled.1, settled.2, settled.3))
    }
}

#[inline(always)]
fn ipv4(ctx: &Ctx, stages: &impl Next) -> Result<Parsed, Action> {
    let Some(ip) = ptr_at::<Ipv4>(ctx, ETH_LEN) else {
        return Err(exception(reason::SHORT_FRAME));
    };
    // SAFETY: the fixed IPv4 header is inside the packet (checked above).
    let (vihl, frag_off, ttl_proto, src, dst, tot_len) = unsafe {
        (
            (*ip).vihl,
            (*ip).frag_off,
            (*ip).ttl_proto,
            (*ip).src,
            (*ip).dst,
            (*ip).tot_len,
        )
    };
    let proto = (ttl_proto >> 8) as u8;
    // A version that contradicts the Ethernet type: nothing here can be
    // trusted to be what it seems.
    if vihl >> 4 != 4 {
        return Err(stages.unhandled(&[src, 0, 0, 0], &[dst, 0, 0, 0], reason::MALFORMED));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMP && frag_off & IPV4_FRAG_MASK_BE == 0 {
            return Err(stages.icmp(ctx, ETH_LEN + (vihl & 0x0f) as usize * 4, FAMILY_V4));
        }
        return Err(Action::Pass);
    }
    let src = [src, 0, 0, 0];
    let dst = [dst, 0, 0, 0];
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(stages.unhandled(&src, &dst, reason::MALFORMED));
    }
    let fragment = if frag_off & IPV4_FRAG_MASK_BE == 0 {
        fragment::NONE
    } else if frag_off & IPV4_OFFSET_MASK_BE == 0 {
        fragment::FIRST
    } else {
        fragment::LATER
    };
    // IPv4 options are skipped, not parsed: forwarding doesn't need them.
    // SAFETY: the fixed IPv4 header is inside the packet (checked above).
    let id = u32::from(unsafe { (*ip).id });
    let Some((s, l4, fragment, id, family)) = settle(ETH_LEN + ihl * 4, fragment, id, FAMILY_V4)
    else {
        return Err(Action::Pass);
    };
    let pkt = Packet {
        family,
        proto,
        l3: ETH_LEN,
        l4,
        ip_end: ETH_LEN + u16::from_be(tot_len) as usize,
        fragment,
        id,
    };
    Ok(Parsed { s, pkt, src, dst })
}

#[inline(always)]
fn ipv6(ctx: &Ctx, stages: &impl Next) -> Result<Parsed, Action> {
    let Some(ip) = ptr_at::<Ipv6>(ctx, ETH_LEN) else {
        return Err(exception(reason::SHORT_FRAME));
    };
    // SAFETY: the IPv6 header is inside the packet (checked above).
    let (mut next, src, dst, payload_len, version) = unsafe {
        (
            (*ip).next_hdr,
            (*ip).src,
            (*ip).dst,
            (*ip).payload_len,
            (*ip).vtc_flow.to_ne_bytes()[0] >> 4,
        )
    };
    if version != 6 {
        return Err(stages.unhandled(&src, &dst, reason::MALFORMED));
    }
    let ip_end = ETH_LEN + mem::size_of::<Ipv6>() + u16::from_be(payload_len) as usize;
    // Extension headers in front of TCP/UDP: hop-by-hop, routing and
    // destination options are stepped over; a fragment header says which
    // part of the datagram this is.
    let mut l4 = ETH_LEN + mem::size_of::<Ipv6>();
    let (mut fragment, mut id) = (fragment::NONE, 0);
    let mut seen_fragment_header = false;
    let mut parsed = 0;
    while parsed < MAX_IPV6_EXTENSIONS {
        if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS {
            // Next header and length together: see `ptr_at`.
            let Some(ext) = ptr_at::<[u8; 2]>(ctx, l4) else {
                return Err(stages.unhandled(&src, &dst, reason::MALFORMED));
            };
            // SAFETY: checked by ptr_at.
            let (n, len) = unsafe { ((*ext)[0], (*ext)[1]) };
            next = n;
            l4 += (usize::from(len) + 1) * 8;
        } else if next == IPV6_FRAGMENT {
            // One datagram has one fragment header (RFC 8200 4.5): a second
            // would make the first's payload bytes look like ports.
            if seen_fragment_header {
                return Err(stages.unhandled(&src, &dst, reason::MALFORMED));
            }
            seen_fragment_header = true;
            let Some(f) = ptr_at::<Ipv6Fragment>(ctx, l4) else {
                return Err(stages.unhandled(&src, &dst, reason::MALFORMED));
            };
            // SAFETY: checked by ptr_at.
            let (n, offset_m, fid) = unsafe { ((*f).next_hdr, (*f).offset_m, (*f).id) };
            next = n;
            l4 += mem::size_of::<Ipv6Fragment>();
            id = fid;
            let offset_m = u16::from_be(offset_m);
            fragment = if offset_m & 0xfff8 != 0 {
                fragment::LATER
            } else if offset_m & 1 != 0 {
                fragment::FIRST
            } else {
                fragment::NONE // an atomic fragment: the whole datagram
            };
        } else {
            break;
        }
        parsed += 1;
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        if is_ipv6_extension(next) {
            return Err(stages.unhandled(&src, &dst, reason::IPV6_EXTENSION));
        }
        if next == PROTO_ICMPV6 && fragment == fragment::NONE {
            return Err(stages.icmp(ctx, l4, FAMILY_V6));
        }
        return Err(Action::Pass);
    }
    if l4 > MAX_L4_OFFSET {
        // Extension headers this long are no load balancer's traffic.
        return Err(stages.unhandled(&src, &dst, reason::IPV6_EXTENSION));
    }
    let Some((s, l4, fragment, id, family)) = settle(l4, fragment, id, FAMILY_V6) else {
        return Err(Action::Pass);
    };
    let pkt = Packet {
        family,
        proto: next,
        l3: ETH_LEN,
        l4,
        ip_end,
        fragment,
        id,
    };
    Ok(Parsed { s, pkt, src, dst })
}

/// The packet's ports: from its TCP/UDP header, or for a later fragment
/// from what its first fragment left in `FRAGMENTS`. Errors are the reason
/// codes of packets passed unhandled.
#[inline(always)]
pub fn ports(
    ctx: &Ctx,
    s: &mut Scratch,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> Result<(u16, u16), u32> {
    if pkt.fragment == fragment::LATER {
        fragment_key(s, pkt, src, dst);
        match FRAGMENTS.get_ptr(&s.fragment_key) {
            // SAFETY: a live map value, copied out at once.
            Some(ports) => Ok(unsafe { ((*ports).src, (*ports).dst) }),
            // Its first fragment wasn't seen (or wasn't ours).
            None => Err(reason::FRAGMENT),
        }
    } else {
        let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4) else {
            return Err(reason::MALFORMED);
        };
        // SAFETY: checked by ptr_at.
        Ok(unsafe { ((*ports).src, (*ports).dst) })
    }
}

/// A first fragment of our traffic: the later ones will need its ports.
#[inline(always)]
pub fn remember_ports(
    s: &mut Scratch,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
) {
    fragment_key(s, pkt, src, dst);
    let ports = Ports {
        src: sport,
        dst: dport,
    };
    let _ = FRAGMENTS.insert(&s.fragment_key, &ports, 0);
}

/// The `FRAGMENTS` key of the packet's datagram, in the scratch area.
#[inline(always)]
fn fragment_key(s: &mut Scratch, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) {
    let k = &mut s.fragment_key;
    copy_addr(&mut k.src, src);
    copy_addr(&mut k.dst, dst);
    k.id = pkt.id;
    k.proto = pkt.proto;
    k.family = pkt.family;
    k._pad = 0;
}

/// Lengths checked only for packets we are about to rewrite.
#[inline(always)]
pub fn validate(ctx: &Ctx, pkt: &Packet) -> Result<(), u32> {
    let l4_len = if pkt.fragment == fragment::LATER {
        0
    } else if pkt.proto == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if ctx.data + pkt.l4 + l4_len > ctx.data_end {
        return Err(reason::TRUNCATED);
    }
    if pkt.ip_end < pkt.l4 + l4_len || pkt.ip_end > ctx.len {
        return Err(reason::BAD_LENGTH);
    }
    Ok(())
}

/// The TCP flags byte (0 if the header is cut short).
#[inline(always)]
pub fn tcp_flags(ctx: &Ctx, pkt: &Packet) -> u8 {
    // The data offset byte and the flags byte as one word: see `ptr_at`.
    match ptr_at::<u16>(ctx, pkt.l4 + TCP_FLAGS_OFFSET - 1) {
        // SAFETY: checked by ptr_at. The flags are the word's second byte.
        Some(word) => (u16::from_be(unsafe { word.read_unaligned() }) & 0xff) as u8,
        None => 0,
    }
}

/// The TCP sequence and acknowledgement numbers, network byte order ((0, 0)
/// if the header is cut short).
#[inline(always)]
pub fn tcp_seq_ack(ctx: &Ctx, pkt: &Packet) -> (u32, u32) {
    // The offset read back through memory: LLVM would otherwise drop this
    // bounds check as implied by `validate`'s, which the verifier can't
    // relate to this pointer.
    // SAFETY: a read of a local.
    let l4 = unsafe { core::ptr::read_volatile(&pkt.l4) } & MAX_L4_OFFSET;
    match ptr_at::<[u32; 2]>(ctx, l4 + TCP_SEQ_OFFSET) {
        // SAFETY: checked by ptr_at.
        Some(words) => unsafe {
            let words = words.read_unaligned();
            (words[0], words[1])
        },
        None => (0, 0),
    }
}
