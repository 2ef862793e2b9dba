//! Forwarding: the next hop from the flow's cached FIB result or a FIB
//! lookup, TTL, MAC addresses, and the egress decision.

use core::mem;

use agent_common::{FAMILY_V4, FIB_CACHE_SHIFT, FibCache, reason};
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_ktime_get_coarse_ns},
};
use network_types::eth::EthHdr;

use crate::{
    csum::Diff,
    headers::{Ipv4, Ipv6},
    lb::{Action, Ctx, Packet, Scratch, exception, ptr_at},
};

/// Sends the rewritten packet towards its new destination: by the flow's
/// cached FIB result while it is fresh, else by a FIB lookup (then cached).
/// A FIB lookup costs more than the rest of the fast path together.
#[inline(always)]
pub fn forward(
    ctx: &Ctx,
    pkt: &Packet,
    s: &mut Scratch,
    src: &[u32; 4],
    dst: &[u32; 4],
    cache: &mut FibCache,
) -> Action {
    // SAFETY: plain helper call.
    let now = (unsafe { bpf_ktime_get_coarse_ns() } >> FIB_CACHE_SHIFT) as u32;
    if cache.ifindex == 0 || cache.stamp != now {
        if let Err(code) = lookup(ctx, pkt, &mut s.fib, src, dst) {
            return exception(code);
        }
        cache.ifindex = s.fib.ifindex;
        cache.dmac = s.fib.dmac;
        cache.smac = s.fib.smac;
        cache.stamp = now;
    }
    if !decrement_ttl(ctx, pkt) {
        return exception(reason::TTL_EXCEEDED);
    }
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            (*eth).dst_addr = cache.dmac;
            (*eth).src_addr = cache.smac;
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
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is its empty state.
    *params = unsafe { mem::zeroed() };
    params.family = pkt.family;
    params.l4_protocol = pkt.proto;
    params.ifindex = ctx.ifindex;
    params.__bindgen_anon_1.tot_len = (pkt.ip_end - pkt.l3) as u16;
    if pkt.family == FAMILY_V4 {
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: params is a valid, initialised struct of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.raw,
            params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(()),
        // The kernel resolves the neighbour and forwards this packet itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(reason::FIB_NO_NEIGHBOUR),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(reason::FIB_FRAG_NEEDED),
        _ => Err(reason::FIB_NO_ROUTE),
    }
}

/// Returns false (and changes nothing) when the packet must not be forwarded.
#[inline(always)]
fn decrement_ttl(ctx: &Ctx, pkt: &Packet) -> bool {
    if pkt.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4>(ctx, pkt.l3) else {
            return false;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            let old = (*ip).ttl_proto;
            // The TTL is the first byte of the word, the low byte once loaded.
            let ttl = old as u8;
            if ttl <= 1 {
                return false;
            }
            let new = (old & 0xff00) | u16::from(ttl - 1);
            (*ip).ttl_proto = new;
            (*ip).check = Diff::default().word16(old, new).apply((*ip).check);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6>(ctx, pkt.l3) else {
            return false;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            if (*ip).hop_limit <= 1 {
                return false;
            }
            (*ip).hop_limit -= 1;
        }
    }
    true
}
