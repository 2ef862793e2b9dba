//! Stage 7: forwarding. The next hop from the flow's cached FIB result or a FIB
//! lookup, TTL, MAC addresses, and the egress decision.

use core::mem;

use agent_common::{FAMILY_V4, FibCache, reason};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup_helper,
};
use network_types::eth::EthHdr;

use crate::{
    csum::Diff,
    headers::{Ipv4, Ipv6},
    maps::FIB_GENERATION,
    packet::{Action, Ctx, Packet, copy_addr, ptr_at},
    stats::exception,
};

/// Sends the rewritten packet towards its new destination: by the flow's
/// cached FIB result while it is current, else by a FIB lookup (then cached).
/// A FIB lookup costs more than the rest of the fast path together, and even
/// reading the clock costs a fifth of it: freshness is a generation number.
/// `dsr`: the packet still has the VIP as its destination (`dst` is the
/// backend's address): the kernel can't be handed it to finish the job.
#[inline(always)]
pub fn to_next_hop(
    ctx: &Ctx,
    pkt: &Packet,
    params: &mut bpf_fib_lookup,
    src: &[u32; 4],
    dst: &[u32; 4],
    cache: &mut FibCache,
    dsr: bool,
) -> Action {
    // The agent bumps the generation whenever rtnetlink reports a route,
    // neighbour, address or link change; a result of an older generation
    // is stale.
    let now = FIB_GENERATION.get(0).copied().unwrap_or(0);
    if cache.ifindex == 0 || cache.stamp != now {
        if let Err(code) = lookup(ctx, pkt, params, src, dst) {
            return exception(match code {
                reason::FIB_NO_NEIGHBOUR if dsr => reason::DSR_NO_NEIGHBOUR,
                reason::FIB_FRAG_NEEDED if dsr => reason::DSR_TOO_BIG,
                _ => code,
            });
        }
        // Byte by byte: copying the 6-byte arrays becomes memmove calls.
        let (d, m) = (&params.dmac, &params.smac);
        cache.macs = [
            u32::from_ne_bytes([d[0], d[1], d[2], d[3]]),
            u32::from_ne_bytes([d[4], d[5], m[0], m[1]]),
            u32::from_ne_bytes([m[2], m[3], m[4], m[5]]),
        ];
        cache.ifindex = params.ifindex;
        cache.stamp = now;
    }
    decrement_ttl(ctx, pkt);
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        let words = eth.cast::<u32>();
        // SAFETY: the 12 address bytes are inside the packet (ptr_at); word
        // stores, because a byte-array copy becomes a memmove call here.
        unsafe {
            words.write_unaligned(cache.macs[0]);
            words.add(1).write_unaligned(cache.macs[1]);
            words.add(2).write_unaligned(cache.macs[2]);
        }
    }
    if cache.ifindex == ctx.ifindex {
        Action::Tx
    } else {
        Action::Redirect(cache.ifindex)
    }
}

#[inline(always)]
fn lookup(
    ctx: &Ctx,
    pkt: &Packet,
    params: &mut bpf_fib_lookup,
    src: &[u32; 4],
    dst: &[u32; 4],
) -> Result<(), u32> {
    // Every input field the kernel reads is set (no flags: no table id, no
    // mark); no zeroing of the whole block, which would be a memset call.
    params.family = pkt.family;
    params.l4_protocol = pkt.proto;
    params.sport = 0;
    params.dport = 0;
    params.ifindex = ctx.ifindex;
    // XDP frames are single frames: their length is checked against the
    // egress MTU. An skb may be a GSO/GRO super-packet, larger than the MTU
    // and segmented on the way out: with no length the helper asks the
    // kernel whether the skb itself can be forwarded, which knows that.
    params.__bindgen_anon_1.tot_len = if ctx.skb {
        0
    } else {
        (pkt.ip_end - pkt.l3) as u16
    };
    params.__bindgen_anon_2.flowinfo = 0;
    // SAFETY: writing the IPv6 member of the address unions (IPv4 is its
    // first word, so an IPv4 address, zero-padded, is written the same way).
    unsafe {
        copy_addr(&mut params.__bindgen_anon_3.ipv6_src, src);
        copy_addr(&mut params.__bindgen_anon_4.ipv6_dst, dst);
    }
    // SAFETY: params is a valid, initialised struct of the size passed.
    let rc =
        unsafe { fib_lookup_helper(ctx.raw, params, mem::size_of::<bpf_fib_lookup>() as i32, 0) }
            as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(()),
        // The kernel resolves the neighbour and forwards this packet itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(reason::FIB_NO_NEIGHBOUR),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(reason::FIB_FRAG_NEEDED),
        _ => Err(reason::FIB_NO_ROUTE),
    }
}

/// False when the TTL (hop limit) would expire here: the kernel must answer.
#[inline(always)]
pub fn ttl_allows_forwarding(ctx: &Ctx, pkt: &Packet) -> bool {
    if pkt.family == FAMILY_V4 {
        match ptr_at::<Ipv4>(ctx, pkt.l3) {
            // SAFETY: inside the packet (ptr_at). The TTL is the word's first
            // byte, the low byte once loaded.
            Some(ip) => (unsafe { (*ip).ttl_proto } as u8) > 1,
            None => false,
        }
    } else {
        match ptr_at::<Ipv6>(ctx, pkt.l3) {
            // SAFETY: inside the packet (ptr_at).
            Some(ip) => (unsafe { (*ip).hop_limit }) > 1,
            None => false,
        }
    }
}

/// Decrements the TTL (hop limit); `pipeline::translate` has checked it is above 1.
#[inline(always)]
fn decrement_ttl(ctx: &Ctx, pkt: &Packet) {
    if pkt.family == FAMILY_V4 {
        if let Some(ip) = ptr_at::<Ipv4>(ctx, pkt.l3) {
            // SAFETY: inside the packet (ptr_at).
            unsafe {
                let old = (*ip).ttl_proto;
                // The TTL is the first byte of the word, the low byte once loaded.
                let new = (old & 0xff00) | u16::from((old as u8).wrapping_sub(1));
                (*ip).ttl_proto = new;
                (*ip).check = Diff::default().word16(old, new).apply((*ip).check);
            }
        }
    } else if let Some(ip) = ptr_at::<Ipv6>(ctx, pkt.l3) {
        // SAFETY: inside the packet (ptr_at).
        unsafe { (*ip).hop_limit = (*ip).hop_limit.wrapping_sub(1) };
    }
}
