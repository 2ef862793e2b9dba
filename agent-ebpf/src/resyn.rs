//! Failover in microseconds: a backend's refusal (RST) of a connect that
//! the service retries becomes, in place, the client's SYN towards the
//! next healthy backend, so the connect goes on at once instead of when
//! the client retransmits its SYN (about a second later).
//!
//! The client's SYN is recorded at its first pass (`remember`, into a slot
//! of `SYN_RECORDS`): its TCP header with the options as sent (MSS, window
//! scale, SACK-permitted, timestamps), and the IP fields that carry over.
//! The pipeline holds the refusal back as before and asks for a resend
//! (`tcp_state::backend_tcp`); the entry point then tail-calls the program
//! here, so the pipeline's own programs carry none of this code for the
//! verifier to walk. It re-points the flow (`tcp_state::retry`, as a
//! retransmitted SYN would), rebuilds the packet as the SYN would leave
//! after NAT, and forwards it the way the pipeline forwards a packet to a
//! backend. Anything it can't do leaves the RST dropped: the client's
//! retransmission is retried as before.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use core::ffi::c_void;

use agent_common::{FAMILY_V4, FLOW_F_VERIFIED, PROTO_TCP, flow_state};
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, xdp_md},
    helpers::generated::{
        bpf_csum_update, bpf_l4_csum_replace, bpf_skb_change_tail, bpf_skb_pull_data,
        bpf_skb_store_bytes, bpf_xdp_adjust_tail, bpf_xdp_store_bytes,
    },
};

use crate::{
    conntrack::Table,
    csum::{fold16, fold32, pseudo_header_sum},
    failure,
    forward::{self, ttl_allows_forwarding},
    headers::{Ipv4, Ipv6, TCP_CHECK_OFFSET, TCP_HDR_LEN},
    maps::{self, BACKEND_FIB, HALF_OPEN, SYN_RECORDS},
    packet::{
        Action, Ctx, Packet, SYN_RECORD_SLOTS, SYN_TCP_WORDS, Scratch, copy_key, fragment, ptr_at,
    },
    stats::account,
    tcp_state::{Resend, retry, syn_facts},
};

/// Refusals of one connect turned into a SYN at once; after that the
/// client's retransmissions pace the retries. It bounds a loop of
/// refusals at packet speed when every backend refuses.
const MAX_RESENDS: u8 = 3;

/// The `SYN_RECORDS` slot of a flow whose forward key hashes to `hash`.
#[inline(always)]
fn slot(hash: u32) -> u32 {
    hash & (SYN_RECORD_SLOTS - 1)
}

/// Records the client's SYN of a new connect of a service that retries
/// (the flow's forward key is `s.key`). Only a SYN checked whole
/// (`integrity`: then its segment is in `s.words`) that fits the record:
/// another keeps the retransmission-based retry. Not atomic: two CPUs
/// recording into one slot at once may mix two records, which `resend`
/// takes for neither flow's (the hash, the ports and the sequence number
/// must match).
#[inline(always)]
pub fn remember(ctx: &Ctx, pkt: &Packet, s: &mut Scratch) {
    let len = pkt.ip_end.wrapping_sub(pkt.l4);
    if !syn_facts(s).0 || !(TCP_HDR_LEN..=SYN_TCP_WORDS * 4).contains(&len) {
        return;
    }
    let hash = s.key.flow_hash();
    let Some(r) = SYN_RECORDS.get_ptr_mut(slot(hash)) else {
        return;
    };
    // SAFETY: an array slot (see the note on races above).
    let r = unsafe { &mut *r };
    if pkt.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4>(ctx, pkt.l3) else {
            return;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            r.ip_word = u32::from((*ip).id) | u32::from((*ip).frag_off) << 16;
            r.tos = (*ip).tos;
            r.ttl = (*ip).ttl_proto as u8;
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6>(ctx, pkt.l3) else {
            return;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            r.ip_word = (*ip).vtc_flow;
            r.tos = 0;
            r.ttl = (*ip).hop_limit;
        }
    }
    let mut i = 0;
    while i < SYN_TCP_WORDS {
        // SAFETY: inside both arrays; volatile, or the loop becomes a
        // memcpy call.
        unsafe { core::ptr::write_volatile(&mut r.tcp[i], s.words[i]) };
        i += 1;
    }
    r.tcp_len = len as u8;
    r.resends = 0;
    r.hash = hash;
}

/// Whether the pipeline asked for a resend on this packet (see
/// `tcp_state::backend_tcp`); the request is consumed.
#[inline(always)]
pub fn requested() -> bool {
    let Some(s) = maps::scratch() else {
        return false;
    };
    // SAFETY: this CPU's scratch area (see `Scratch::resyn`).
    unsafe {
        let asked = core::ptr::read_volatile(&s.resyn) != 0;
        if asked {
            core::ptr::write_volatile(&mut s.resyn, 0);
        }
        asked
    }
}

/// The tail-called program's body: the RST in `ctx` becomes the client's
/// SYN towards the flow's next backend, or is dropped.
#[inline(always)]
pub fn run(ctx: &Ctx) -> Action {
    resend(ctx).unwrap_or(Action::Drop)
}

#[inline(always)]
fn resend(ctx: &Ctx) -> Option<Action> {
    let s = maps::scratch()?;
    copy_key(&mut s.key, &s.resyn_key);
    // SAFETY: a live map value, not aliased by the scratch area.
    let f = unsafe { &mut *HALF_OPEN.get_ptr_mut(&s.key)? };
    let hash = s.key.flow_hash();
    // SAFETY: an array slot (see `remember` on races).
    let rec = unsafe { &mut *SYN_RECORDS.get_ptr_mut(slot(hash))? };
    // The record must be this connect's SYN (another flow's may have taken
    // the slot, a reused 5-tuple's earlier connect may have left it), and
    // the flow still refused.
    if f.state != flow_state::REFUSED
        || rec.hash != hash
        || rec.tcp[0] != u32::from(s.key.sport) | u32::from(s.key.dport) << 16
        || rec.tcp[1] != f.syn_seq
        || rec.resends >= MAX_RESENDS
    {
        return None;
    }
    let v4 = s.key.family == FAMILY_V4;
    let ip_len = if v4 { 20 } else { 40 };
    let (l3, l4) = (s.resyn_l3 as usize, s.resyn_l4 as usize);
    let tcp_len = usize::from(rec.tcp_len);
    // The new headers go where the RST's are, which must have no IP
    // options or extension headers: a partial checksum's start stays put.
    if l4 != l3 + ip_len || l3 > 64 || !(TCP_HDR_LEN..=SYN_TCP_WORDS * 4).contains(&tcp_len) {
        return None;
    }
    let total = l4 + tcp_len;
    resize(ctx, total)?;

    // The client's SYN goes on as its retransmission would: the retry
    // counts it and re-points both entries.
    // SAFETY: writes to this CPU's scratch area (see `Scratch::syn_verified`).
    unsafe {
        core::ptr::write_volatile(
            &mut s.syn_verified,
            u32::from(f.flags & FLOW_F_VERIFIED != 0),
        );
        core::ptr::write_volatile(&mut s.syn_seq, f.syn_seq);
    }
    let refused = f.backend_id;
    retry(
        s,
        f,
        failure::now_ns(),
        Resend::AfterFailure,
        Table::HalfOpen,
    )
    .ok()?;
    if f.backend_id == refused {
        return None; // no other backend: the client's retransmission retries
    }
    rec.resends += 1;

    let pseudo = pseudo_header(v4, &f.new_src, &f.new_dst, tcp_len);
    let ports = u32::from(f.new_sport) | u32::from(f.new_dport) << 16;
    let segment = if v4 {
        build::<5>(s, rec, &f.new_src, &f.new_dst, ports, pseudo, ctx.skb)
    } else {
        build::<10>(s, rec, &f.new_src, &f.new_dst, ports, pseudo, ctx.skb)
    };
    store(ctx, l3, ip_len + tcp_len, s.words.as_mut_ptr().cast())?;
    if ctx.skb {
        skb_tcp_checksum(ctx, l4, pseudo, segment);
    }

    let c = reload(ctx, total)?;
    let pkt = Packet {
        family: s.key.family,
        proto: PROTO_TCP,
        l3,
        l4,
        ip_end: total,
        fragment: fragment::NONE,
        id: 0,
    };
    if !ttl_allows_forwarding(&c, &pkt) {
        return None;
    }
    account(f.service_id, f.backend_id, true, &c);
    // As `pipeline::translate` forwards a packet to a backend.
    let cache = match BACKEND_FIB.get_ptr_mut(f.backend_id) {
        // SAFETY: an array slot; concurrent writers store the same result.
        Some(slot) if unsafe { (*slot).dst == f.new_dst } => unsafe { &mut (*slot).fib },
        _ => &mut f.fib,
    };
    Some(forward::to_next_hop(
        &c, &pkt, &mut s.fib, &f.new_src, &f.new_dst, cache, false,
    ))
}

/// Makes the packet `total` bytes long (the RST is shorter than the SYN).
#[inline(always)]
fn resize(ctx: &Ctx, total: usize) -> Option<()> {
    // SAFETY: helper calls on the context this program was given.
    let rc = unsafe {
        if ctx.skb {
            bpf_skb_change_tail(ctx.raw.cast(), total as u32, 0)
        } else {
            let delta = total as i32 - (ctx.data_end - ctx.data) as i32;
            bpf_xdp_adjust_tail(ctx.raw.cast(), delta)
        }
    };
    (rc == 0).then_some(())
}

/// Writes the `len` bytes built at `from` at offset `l3` of the packet. On
/// an skb, a checksum of the whole packet (`CHECKSUM_COMPLETE`) follows.
#[inline(always)]
fn store(ctx: &Ctx, l3: usize, len: usize, from: *mut c_void) -> Option<()> {
    // The verifier wants the length's bounds on the register: masked to
    // the room in `Scratch::words` (it is 40..=100 unchanged).
    // SAFETY: a read of a local.
    let n = (unsafe { core::ptr::read_volatile(&len) } & 127).max(1) as u32;
    // SAFETY: `from` is `Scratch::words`, 128 bytes; the helpers check
    // the packet's bounds themselves.
    let rc = unsafe {
        if ctx.skb {
            bpf_skb_store_bytes(
                ctx.raw.cast(),
                l3 as u32,
                from,
                n,
                u64::from(BPF_F_RECOMPUTE_CSUM),
            )
        } else {
            bpf_xdp_store_bytes(ctx.raw.cast(), l3 as u32, from, n)
        }
    };
    (rc == 0).then_some(())
}

/// The context's packet pointers after the helpers above moved it.
#[inline(always)]
fn reload(ctx: &Ctx, total: usize) -> Option<Ctx> {
    // SAFETY: the context this program was given, of the type `skb` says.
    let (data, data_end) = unsafe {
        if ctx.skb {
            // An skb's tail may be paged: the headers must be linear.
            if bpf_skb_pull_data(ctx.raw.cast(), total as u32) != 0 {
                return None;
            }
            let skb = ctx.raw.cast::<__sk_buff>();
            ((*skb).data as usize, (*skb).data_end as usize)
        } else {
            let md = ctx.raw.cast::<xdp_md>();
            ((*md).data as usize, (*md).data_end as usize)
        }
    };
    Some(Ctx {
        data,
        data_end,
        len: total,
        ifindex: ctx.ifindex,
        raw: ctx.raw,
        skb: ctx.skb,
    })
}

/// Builds the SYN's IP header and TCP segment in `s.words` (the TCP part
/// from word `BASE`): the client's header and options, with the ports as
/// they leave after NAT (`ports`: the segment's first word) between `src`
/// and `dst` (whose pseudo-header sums to `pseudo`). Returns the segment's folded sum without its checksum.
/// The TCP checksum is written whole for XDP; an skb gets it from
/// `skb_tcp_checksum` (the field holds 0xffff, "nothing summed yet").
#[inline(always)]
fn build<const BASE: usize>(
    s: &mut Scratch,
    rec: &crate::packet::SynRecord,
    src: &[u32; 4],
    dst: &[u32; 4],
    ports: u32,
    pseudo: u32,
    skb: bool,
) -> u32 {
    let w = &mut s.words;
    let tcp_len = u16::from(rec.tcp_len);
    let mut i = 0;
    while i < SYN_TCP_WORDS {
        w[BASE + i] = rec.tcp[i];
        i += 1;
    }
    // Words as they sit in the packet, read as native (little-endian)
    // integers: the first bytes of the packet are the low bits.
    w[BASE] = ports;
    w[BASE + TCP_CHECK_OFFSET / 4] &= 0xffff_0000;
    let mut segment = 0u64;
    let mut i = 0;
    while i < SYN_TCP_WORDS {
        segment += u64::from(w[BASE + i]);
        i += 1;
    }
    let segment = fold32(segment);
    if BASE == 5 {
        let tot = (20 + tcp_len).to_be_bytes();
        w[0] = u32::from_ne_bytes([0x45, rec.tos, tot[0], tot[1]]);
        w[1] = rec.ip_word;
        w[2] = u32::from_ne_bytes([rec.ttl, PROTO_TCP, 0, 0]);
        w[3] = src[0];
        w[4] = dst[0];
        let sum = u64::from(w[0]) + u64::from(w[1]) + u64::from(w[2]) + u64::from(w[3]);
        let check = !fold16(u64::from(fold32(sum + u64::from(w[4]))));
        w[2] |= u32::from(check) << 16;
    } else {
        let plen = tcp_len.to_be_bytes();
        w[0] = rec.ip_word;
        w[1] = u32::from_ne_bytes([plen[0], plen[1], PROTO_TCP, rec.ttl]);
        let mut i = 0;
        while i < 4 {
            w[2 + i] = src[i];
            w[6 + i] = dst[i];
            i += 1;
        }
    }
    let check = if skb {
        0xffff
    } else {
        !fold16(u64::from(pseudo) + u64::from(segment))
    };
    w[BASE + TCP_CHECK_OFFSET / 4] |= u32::from(check);
    segment
}

/// Sets the TCP checksum of the SYN built by `build` on an skb, whatever
/// its checksum state: the pseudo-header through `BPF_F_PSEUDO_HDR` (with
/// `CHECKSUM_PARTIAL` the field holds just that, and the device or the
/// receiver sums the segment), then the segment (ignored when partial).
/// With `CHECKSUM_COMPLETE` the field's change is taken out of the
/// packet's sum (`bpf_csum_update` does nothing otherwise).
#[inline(always)]
fn skb_tcp_checksum(ctx: &Ctx, l4: usize, pseudo: u32, segment: u32) {
    let offset = (l4 + TCP_CHECK_OFFSET) as u32;
    // SAFETY: helper calls on the skb this TC program was given; `from` 0
    // with no size in the flags means "add this difference".
    unsafe {
        bpf_l4_csum_replace(
            ctx.raw.cast(),
            offset,
            0,
            u64::from(pseudo),
            u64::from(BPF_F_PSEUDO_HDR),
        );
        bpf_l4_csum_replace(ctx.raw.cast(), offset, 0, u64::from(segment), 0);
        bpf_csum_update(ctx.raw.cast(), !segment);
    }
}

/// The pseudo-header's sum folded to 32 bits.
#[inline(always)]
fn pseudo_header(v4: bool, src: &[u32; 4], dst: &[u32; 4], len: usize) -> u32 {
    fold32(pseudo_header_sum(v4, PROTO_TCP, src, dst, len))
}
