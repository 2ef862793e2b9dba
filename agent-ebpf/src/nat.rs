//! Stage 6: the rewrite. New addresses and ports, with the checksums fixed
//! incrementally (by hand for XDP, by the skb helper for TC's L4 checksum).

use agent_common::{FAMILY_V4, FlowKey, PROTO_TCP};
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_l4_csum_replace,
};

use crate::{
    csum::Diff,
    headers::{Ipv4, Ipv6, Ports, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET},
    packet::{Ctx, Packet, fragment, ptr_at},
};

/// Writes the new addresses and ports and fixes the checksums incrementally:
/// in the packet (XDP), or, for the L4 checksum of an skb, by returning the
/// change for `skb_l4_checksum`.
#[inline(always)]
pub fn rewrite(
    ctx: &Ctx,
    pkt: &Packet,
    old: &FlowKey,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> L4Change {
    let addrs = Diff::default().addr(&old.src, src).addr(&old.dst, dst);
    let ports = Diff::default()
        .word16(old.sport, sport)
        .word16(old.dport, dport);
    let l4 = addrs.word16(old.sport, sport).word16(old.dport, dport);
    let change = L4Change { addrs, ports };

    if pkt.family == FAMILY_V4 {
        if let Some(ip) = ptr_at::<Ipv4>(ctx, pkt.l3) {
            // SAFETY: inside the packet (ptr_at); no other reference to it.
            unsafe {
                (*ip).src = src[0];
                (*ip).dst = dst[0];
                (*ip).check = addrs.apply((*ip).check);
            }
        }
    } else if let Some(ip) = ptr_at::<Ipv6>(ctx, pkt.l3) {
        // SAFETY: as above.
        unsafe {
            (*ip).src = *src;
            (*ip).dst = *dst;
        }
    }
    // A later fragment has no L4 header: its bytes there are payload. (The
    // first fragment's L4 checksum covers the whole datagram; the change to
    // it is the same.)
    if pkt.fragment != fragment::LATER
        && let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4)
    {
        // SAFETY: as above.
        unsafe {
            (*ports).src = sport;
            (*ports).dst = dport;
        }
    }
    if ctx.skb || pkt.fragment == fragment::LATER {
        return change;
    }
    if pkt.proto == PROTO_TCP {
        if let Some(check) = ptr_at::<u16>(ctx, pkt.l4 + TCP_CHECK_OFFSET) {
            // SAFETY: as above.
            unsafe { *check = l4.apply(*check) };
        }
    } else if let Some(check) = ptr_at::<u16>(ctx, pkt.l4 + UDP_CHECK_OFFSET) {
        // SAFETY: as above.
        unsafe {
            // IPv4 UDP may carry no checksum (zero); it must stay zero. A
            // computed zero is sent as all ones (RFC 768).
            if !(pkt.family == FAMILY_V4 && *check == 0) {
                let c = l4.apply(*check);
                *check = if c == 0 { 0xffff } else { c };
            }
        }
    }
    change
}

/// The L4 checksum change of a rewrite that `rewrite` left to the skb
/// helper (TC): the address part belongs to the pseudo-header, the ports to
/// the segment itself.
#[derive(Clone, Copy)]
pub struct L4Change {
    addrs: Diff,
    ports: Diff,
}

/// Applies `change` with `bpf_l4_csum_replace`, which knows what the packet
/// bytes can't say: with `CHECKSUM_PARTIAL` (a local sender's packet, a veth,
/// a GSO super-packet) the field holds the pseudo-header sum and only the
/// address change applies; otherwise the whole change does, and a
/// `CHECKSUM_COMPLETE` sum is kept right.
#[inline(always)]
pub fn skb_l4_checksum(ctx: &Ctx, pkt: &Packet, change: L4Change) {
    let (offset, mangled_zero) = if pkt.proto == PROTO_TCP {
        (pkt.l4 + TCP_CHECK_OFFSET, 0)
    } else {
        // UDP over IPv4 may carry no checksum (zero): it stays zero, and a
        // computed zero is sent as all ones (RFC 768).
        (pkt.l4 + UDP_CHECK_OFFSET, u64::from(BPF_F_MARK_MANGLED_0))
    };
    // SAFETY: helper calls on the skb this TC program was given; `from` 0
    // with no size in the flags means "add this difference".
    unsafe {
        bpf_l4_csum_replace(
            ctx.raw.cast(),
            offset as u32,
            0,
            u64::from(change.addrs.wsum()),
            u64::from(BPF_F_PSEUDO_HDR) | mangled_zero,
        );
        bpf_l4_csum_replace(
            ctx.raw.cast(),
            offset as u32,
            0,
            u64::from(change.ports.wsum()),
            mangled_zero,
        );
    }
}
