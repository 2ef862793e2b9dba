//! The backend host's side of tunnelled direct server return
//! (`sluice backend-decap`, a TC ingress program): an IPIP or IP6IP6 packet
//! whose inner destination is one of the configured VIPs (`DECAP_VIPS`)
//! loses its outer header and goes up the stack as the client sent it, to
//! the VIP on the host's loopback; the backend's answer then goes to the
//! client directly. Anything else passes untouched; an encapsulated packet
//! to a configured VIP that is cut short or contradicts its lengths is
//! dropped and counted (`DECAP_COUNTS`). On the way out, the backend's
//! SYN-ACKs from a VIP get their MSS clamped (`clamp_replies`), so that the
//! client's segments still fit once wrapped.
//!
//! Stateless, as Katran's decap: any host that can send IPIP to the
//! backend can deliver packets to the VIP with any source address. Filter
//! IPIP and IP6IP6 from outside at the edge.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference on purpose: by value they would be \
              copied onto the 512-byte BPF stack"
)]

use agent_common::{DecapVip, FAMILY_V4, FAMILY_V6, decap_count};
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::bpf_skb_adjust_room,
    programs::TcContext,
};

use crate::{
    encap::clamp_mss,
    headers::{Ipv4, Ipv6},
    maps::{DECAP_COUNTS, DECAP_VIPS},
    packet::{Ctx, ETH_LEN},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_TCP: u8 = 6;

/// What to do with an encapsulated packet.
enum Verdict {
    /// Not encapsulated, or not to a configured VIP.
    Untouched,
    /// Unwrap: the outer header is this long.
    Strip(u32),
    /// To a configured VIP, but malformed.
    Malformed,
}

/// The program's body.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // Headers may sit in paged data: the outer and inner IP headers must be
    // in the linear part.
    let want = (ETH_LEN + 40 + 40) as u32;
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(ctx.len().min(want));
    }
    match classify(ctx) {
        Verdict::Untouched => TC_ACT_OK,
        Verdict::Malformed => {
            count(decap_count::MALFORMED);
            TC_ACT_SHOT
        }
        Verdict::Strip(outer) => {
            // FIXED_GSO: a packet GRO merged keeps its inner segment size
            // (the outer header was no part of it).
            // SAFETY: plain helper call on this program's skb.
            let rc = unsafe {
                bpf_skb_adjust_room(
                    ctx.skb.skb,
                    -(outer as i32),
                    BPF_ADJ_ROOM_MAC,
                    u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
                )
            };
            if rc != 0 {
                count(decap_count::MALFORMED);
                return TC_ACT_SHOT;
            }
            count(decap_count::DECAPSULATED);
            TC_ACT_OK
        }
    }
}

/// The backend's own side (TC egress of the same interface): its SYN-ACKs
/// from a configured VIP announce an MSS small enough for the client's
/// segments to fit the MTU once the load balancer wraps them (the value
/// of the VIP's `DECAP_VIPS` entry). The load balancer, which never sees
/// the SYN-ACK, can't. Every packet passes.
#[inline(always)]
pub fn clamp_replies(ctx: &TcContext) -> i32 {
    let want = (ETH_LEN + 40 + 60) as u32;
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(ctx.len().min(want));
    }
    let Some(proto) = at::<u16>(ctx, 12) else {
        return TC_ACT_OK;
    };
    // SAFETY: inside the packet (at).
    let (key, l4) = match u16::from_be(unsafe { *proto }) {
        ETH_P_IP => {
            let Some(ip) = at::<Ipv4>(ctx, ETH_LEN) else {
                return TC_ACT_OK;
            };
            // SAFETY: inside the packet (at).
            let (vihl, ttl_proto, src) = unsafe { ((*ip).vihl, (*ip).ttl_proto, (*ip).src) };
            if (ttl_proto >> 8) as u8 != IPPROTO_TCP {
                return TC_ACT_OK;
            }
            let key = DecapVip {
                addr: [src, 0, 0, 0],
                family: u32::from(FAMILY_V4),
            };
            (key, ETH_LEN + usize::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let Some(ip) = at::<Ipv6>(ctx, ETH_LEN) else {
                return TC_ACT_OK;
            };
            // SAFETY: inside the packet (at).
            let (next, src) = unsafe { ((*ip).next_hdr, (*ip).src) };
            if next != IPPROTO_TCP {
                return TC_ACT_OK;
            }
            let key = DecapVip {
                addr: src,
                family: u32::from(FAMILY_V6),
            };
            (key, ETH_LEN + 40)
        }
        _ => return TC_ACT_OK,
    };
    // SAFETY: a lookup by a key on the stack; the value is copied out.
    let Some(max) = (unsafe { DECAP_VIPS.get(&key) }).copied() else {
        return TC_ACT_OK;
    };
    let c = Ctx {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.len() as usize,
        // SAFETY: the skb pointer the kernel passed in.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        raw: ctx.skb.skb.cast(),
        skb: true,
    };
    clamp_mss(&c, l4, max.min(0xffff) as u16);
    TC_ACT_OK
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = DECAP_COUNTS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer while this program runs here.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Verdict {
    let Some(proto) = at::<u16>(ctx, 12) else {
        return Verdict::Untouched;
    };
    // SAFETY: inside the packet (at).
    match u16::from_be(unsafe { *proto }) {
        ETH_P_IP => outer_v4(ctx),
        ETH_P_IPV6 => outer_v6(ctx),
        _ => Verdict::Untouched,
    }
}

/// An outer IPv4 header: IPIP (an inner IPv4 packet) only.
#[inline(always)]
fn outer_v4(ctx: &TcContext) -> Verdict {
    let Some(ip) = at::<Ipv4>(ctx, ETH_LEN) else {
        return Verdict::Untouched;
    };
    // SAFETY: inside the packet (at).
    let (vihl, ttl_proto, tot_len, frag) =
        unsafe { ((*ip).vihl, (*ip).ttl_proto, (*ip).tot_len, (*ip).frag_off) };
    if (ttl_proto >> 8) as u8 != IPPROTO_IPIP {
        return Verdict::Untouched;
    }
    let outer = usize::from(vihl & 0x0f) * 4;
    // The inner destination decides whether this packet is ours; before it
    // is known, a malformed outer header is nobody's business here.
    let inner = ETH_LEN + outer.clamp(20, 60);
    let Some(dst) = at::<u32>(ctx, inner + 16) else {
        // Too short to name an inner destination: not provably ours.
        return Verdict::Untouched;
    };
    // SAFETY: inside the packet (at).
    let key = DecapVip {
        addr: [unsafe { *dst }, 0, 0, 0],
        family: u32::from(FAMILY_V4),
    };
    // SAFETY: a lookup by a key on the stack.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        count(decap_count::NOT_OURS);
        return Verdict::Untouched;
    }
    // Ours: everything must add up. A fragment of the outer packet (offset
    // or more-fragments) can't be unwrapped alone.
    let frame_ip_len = ctx.len() as usize - ETH_LEN;
    let Some(inner_ip) = at::<Ipv4>(ctx, inner) else {
        return Verdict::Malformed;
    };
    // SAFETY: inside the packet (at).
    let (inner_vihl, inner_len) = unsafe { ((*inner_ip).vihl, (*inner_ip).tot_len) };
    let tot = usize::from(u16::from_be(tot_len));
    let inner_tot = usize::from(u16::from_be(inner_len));
    if vihl >> 4 != 4
        || outer < 20
        || frag & 0x3fffu16.to_be() != 0
        || inner_vihl >> 4 != 4
        || usize::from(inner_vihl & 0x0f) * 4 < 20
        || tot > frame_ip_len
        || inner_tot + outer != tot
    {
        return Verdict::Malformed;
    }
    Verdict::Strip(outer as u32)
}

/// An outer IPv6 header: IP6IP6 (next header 41, no extension headers) only.
#[inline(always)]
fn outer_v6(ctx: &TcContext) -> Verdict {
    let Some(ip) = at::<Ipv6>(ctx, ETH_LEN) else {
        return Verdict::Untouched;
    };
    // SAFETY: inside the packet (at).
    let (next, payload) = unsafe { ((*ip).next_hdr, (*ip).payload_len) };
    if next != IPPROTO_IPV6 {
        return Verdict::Untouched;
    }
    let inner = ETH_LEN + 40;
    let Some(dst) = at::<[u32; 4]>(ctx, inner + 24) else {
        return Verdict::Untouched;
    };
    // SAFETY: inside the packet (at).
    let key = DecapVip {
        addr: unsafe { *dst },
        family: u32::from(FAMILY_V6),
    };
    // SAFETY: a lookup by a key on the stack.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        count(decap_count::NOT_OURS);
        return Verdict::Untouched;
    }
    let Some(inner_ip) = at::<Ipv6>(ctx, inner) else {
        return Verdict::Malformed;
    };
    // SAFETY: inside the packet (at).
    let (inner_word, inner_payload) = unsafe { ((*inner_ip).vtc_flow, (*inner_ip).payload_len) };
    let frame_ip_len = ctx.len() as usize - ETH_LEN;
    let payload = usize::from(u16::from_be(payload));
    if u32::from_be(inner_word) >> 28 != 6
        || 40 + payload > frame_ip_len
        || usize::from(u16::from_be(inner_payload)) + 40 != payload
    {
        return Verdict::Malformed;
    }
    Verdict::Strip(40)
}
