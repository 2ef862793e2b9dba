//! Tunnelled direct server return: a DSR flow's packet, unchanged but for
//! its Ethernet addresses (written by `forward`), wrapped in an outer IPv4
//! (IPIP, protocol 4) or IPv6 (IP6IP6, next header 41) header from the
//! service's `snat_addr` to the backend's address. The backend host's
//! `sluice_decap` (see `decap`) unwraps it, and the backend answers the
//! client directly.
//!
//! The pipeline asks for it (`request`, after `forward::to_next_hop`) and
//! the entry point tail-calls `run`, so the pipeline's programs carry none
//! of this code for the verifier to walk. The outer header makes the packet
//! longer: a client's SYN has its MSS option clamped so that the
//! connection's segments fit the egress MTU once wrapped; a packet that
//! still would not fit is dropped and counted (`dsr_too_big`).

use agent_common::{FAMILY_V4, FLOW_F_DSR_TUNNEL, Flow, PROTO_TCP, reason};
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_l4_csum_replace, bpf_skb_adjust_room, bpf_skb_store_bytes,
        bpf_xdp_adjust_head,
    },
};

use crate::{
    csum::{Diff, fold16},
    headers::{TCP_CHECK_OFFSET, TCP_FLAGS_OFFSET, TCP_HDR_LEN, TCP_SYN},
    maps,
    packet::{Action, Ctx, ETH_LEN, EncapRequest, Packet, copy_addr, ptr_at},
    stats::exception,
};

/// IP protocol numbers of the inner packet, in the outer header.
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const OUTER_V4: u32 = 20;
const OUTER_V6: u32 = 40;
const OUTER_TTL: u8 = 64;
/// TCP option kinds.
const TCPOPT_END: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// How many TCP options `clamp_mss` looks at for the MSS option.
const MAX_OPTIONS_WALKED: usize = 8;

/// Asks for the wrapping of the packet being forwarded by `f` (a tunnelled
/// DSR flow) towards `action`'s egress. Other flows and actions: nothing.
#[inline(always)]
pub fn request(r: &mut EncapRequest, ctx: &Ctx, pkt: &Packet, f: &Flow, action: &Action) {
    if f.flags & FLOW_F_DSR_TUNNEL == 0 {
        return;
    }
    let (ifindex, tx) = match action {
        Action::Tx => (ctx.ifindex, 1),
        Action::Redirect(ifindex) => (*ifindex, 0),
        Action::Pass | Action::Drop => return,
    };
    copy_addr(&mut r.outer_src, &f.new_src);
    copy_addr(&mut r.outer_dst, &f.new_dst);
    r.ifindex = ifindex;
    r.tx = tx;
    r.l3 = pkt.l3 as u32;
    r.l4 = pkt.l4 as u32;
    r.family = pkt.family;
    r.proto = pkt.proto;
    // SAFETY: this CPU's scratch area; volatile so that the entry point
    // reads it back from memory (see `requested`).
    unsafe { core::ptr::write_volatile(&mut r.requested, 1) };
}

/// Whether the pipeline asked for a wrapping of this packet; the request
/// is consumed.
#[inline(always)]
pub fn requested() -> bool {
    let Some(s) = maps::scratch() else {
        return false;
    };
    // SAFETY: this CPU's scratch area (see `EncapRequest::requested`).
    unsafe {
        let asked = core::ptr::read_volatile(&s.encap.requested) != 0;
        if asked {
            core::ptr::write_volatile(&mut s.encap.requested, 0);
        }
        asked
    }
}

/// The tail call found no program: the packet must not leave unwrapped.
#[inline(always)]
pub fn unavailable() -> Action {
    exception(reason::DSR_ENCAP_FAILED)
}

/// The tail-called program's body: wraps the packet in `ctx` as the
/// scratch area's request says, and returns where it goes.
#[inline(always)]
pub fn run(ctx: &Ctx) -> Action {
    let Some(s) = maps::scratch() else {
        return unavailable();
    };
    let r = &s.encap;
    let v4 = r.family == FAMILY_V4;
    let outer = if v4 { OUTER_V4 } else { OUTER_V6 };
    // Does the wrapped packet fit the egress device? (For a GSO skb the
    // helper checks its segments.) It also says the device's MTU.
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call with this program's context and a local.
    let rc = unsafe { bpf_check_mtu(ctx.raw, r.ifindex, &mut mtu, outer as i32, 0) };
    if rc < 0 {
        return unavailable();
    }
    if rc as u32 != BPF_MTU_CHK_RET_SUCCESS {
        return exception(reason::DSR_TOO_BIG);
    }
    if r.proto == PROTO_TCP {
        // What a segment may carry: the MTU less both IP headers and TCP's
        // own (MSS counts no TCP options).
        let inner_ip = r.l4.wrapping_sub(r.l3);
        let max = mtu
            .saturating_sub(outer)
            .saturating_sub(inner_ip)
            .saturating_sub(TCP_HDR_LEN as u32);
        clamp_mss(ctx, r.l4 as usize, max.min(0xffff) as u16);
    }
    let (ifindex, tx) = (r.ifindex, r.tx);
    let wrapped = if ctx.skb {
        wrap_skb(ctx, r, v4, outer)
    } else {
        wrap_xdp(ctx, r, v4, outer)
    };
    if wrapped.is_err() {
        return unavailable();
    }
    if tx != 0 {
        Action::Tx
    } else {
        Action::Redirect(ifindex)
    }
}

/// Lowers the MSS option of a SYN (or SYN-ACK) to `max`, fixing the TCP
/// checksum. Other segments, and a SYN without the option, are left alone.
#[inline(always)]
pub fn clamp_mss(ctx: &Ctx, l4: usize, max: u16) {
    // Bounded for the verifier: the inner headers are in the first 255 bytes.
    if l4 > 255 {
        return;
    }
    let Some(tcp) = ptr_at::<[u8; TCP_HDR_LEN]>(ctx, l4) else {
        return;
    };
    // SAFETY: inside the packet (ptr_at).
    let (offset_byte, flags) = unsafe { ((*tcp)[12], (*tcp)[TCP_FLAGS_OFFSET]) };
    if flags & TCP_SYN == 0 {
        return;
    }
    let header_len = usize::from(offset_byte >> 4) * 4;
    let mut at = TCP_HDR_LEN;
    // The first options only: every stack puts MSS first (Linux, Windows,
    // BSD), and each option walked multiplies the paths the verifier
    // walks: 40, enough for any option list, cost the TC program about
    // 800,000 verified instructions (near the limit); 8 cost about 9,400.
    // A SYN whose MSS comes later keeps it.
    for _ in 0..MAX_OPTIONS_WALKED {
        if at + 4 > header_len {
            return;
        }
        let Some(opt) = ptr_at::<[u8; 4]>(ctx, l4 + at) else {
            return;
        };
        // SAFETY: inside the packet (ptr_at).
        let o = unsafe { &mut *opt };
        match o[0] {
            TCPOPT_END => return,
            TCPOPT_NOP => {
                at += 1;
                continue;
            }
            TCPOPT_MSS if o[1] == 4 => {
                let old = u16::from_be_bytes([o[2], o[3]]);
                // At an odd offset (after an odd number of NOPs, which no
                // stack sends) the value straddles two checksum words and
                // the one-word update below would be wrong: left alone.
                if old > max && at & 1 == 0 {
                    set_mss(ctx, l4, tcp, opt, old, max);
                }
                return;
            }
            _ => {}
        }
        let len = usize::from(o[1]);
        if len < 2 {
            return;
        }
        at += len;
    }
}

/// Writes `new` into the MSS option at `opt` (once `old`) of the TCP
/// header at `tcp` (offset `l4`), and the change into the TCP checksum: by
/// hand for XDP, by the skb helper for TC (which leaves a checksum the
/// device or the stack completes alone).
#[inline(always)]
fn set_mss(
    ctx: &Ctx,
    l4: usize,
    tcp: *mut [u8; TCP_HDR_LEN],
    opt: *mut [u8; 4],
    old: u16,
    new: u16,
) {
    let [hi, lo] = new.to_be_bytes();
    // SAFETY: inside the packet (checked by the caller's ptr_at).
    unsafe {
        (*opt)[2] = hi;
        (*opt)[3] = lo;
    }
    let (old_be, new_be) = (old.to_be(), new.to_be());
    if ctx.skb {
        // SAFETY: plain helper call on this program's skb.
        unsafe {
            bpf_l4_csum_replace(
                ctx.raw.cast(),
                (l4 + TCP_CHECK_OFFSET) as u32,
                u64::from(old_be),
                u64::from(new_be),
                2,
            )
        };
    } else {
        // Through the header's own pointer, whose bounds the verifier knows
        // (a second check of the same bytes is one LLVM may drop).
        // SAFETY: the checksum is inside the 20-byte header checked by the
        // caller's ptr_at.
        unsafe {
            let check = tcp.cast::<u8>().add(TCP_CHECK_OFFSET).cast::<u16>();
            let sum = check.read_unaligned();
            check.write_unaligned(Diff::default().word16(old_be, new_be).apply(sum));
        }
    }
}

/// The outer header, built in `buf` (network byte order), for an inner IP
/// packet of `inner_len` bytes.
#[inline(always)]
fn outer_header(buf: &mut [u32; 10], r: &EncapRequest, v4: bool, inner_len: u32) {
    if v4 {
        let total = inner_len + OUTER_V4;
        let (src, dst) = (r.outer_src[0], r.outer_dst[0]);
        // Version 4, header length 5, no TOS; no fragment id or flags;
        // TTL, protocol; the checksum over the rest.
        let w0 = 0x4500_0000u32 | (total & 0xffff);
        let w2 = (u32::from(OUTER_TTL) << 24) | (u32::from(IPPROTO_IPIP) << 16);
        let (s, d) = (u32::from_be(src), u32::from_be(dst));
        let sum = u64::from(w0 >> 16)
            + u64::from(w0 & 0xffff)
            + u64::from(w2 >> 16)
            + u64::from(s >> 16)
            + u64::from(s & 0xffff)
            + u64::from(d >> 16)
            + u64::from(d & 0xffff);
        let check = !fold16(sum);
        buf[0] = w0.to_be();
        buf[1] = 0;
        buf[2] = (w2 | u32::from(check)).to_be();
        buf[3] = src;
        buf[4] = dst;
    } else {
        // Version 6, no traffic class or flow label; payload length, next
        // header, hop limit; the addresses.
        buf[0] = 0x6000_0000u32.to_be();
        buf[1] =
            (((inner_len & 0xffff) << 16) | (u32::from(IPPROTO_IPV6) << 8) | u32::from(OUTER_TTL))
                .to_be();
        // Word by word: a slice copy becomes a memcpy call here.
        let (src, dst) = (&r.outer_src, &r.outer_dst);
        [buf[2], buf[3], buf[4], buf[5]] = [src[0], src[1], src[2], src[3]];
        [buf[6], buf[7], buf[8], buf[9]] = [dst[0], dst[1], dst[2], dst[3]];
    }
}

/// XDP: room in front of the frame, the Ethernet header moved into it, the
/// outer header written after it.
#[inline(always)]
fn wrap_xdp(ctx: &Ctx, r: &EncapRequest, v4: bool, outer: u32) -> Result<(), ()> {
    let inner_len = (ctx.data_end - ctx.data).wrapping_sub(ETH_LEN) as u32;
    let mut buf = [0u32; 10];
    outer_header(&mut buf, r, v4, inner_len);
    let raw = ctx.raw.cast::<aya_ebpf::bindings::xdp_md>();
    // SAFETY: plain helper call on this program's frame.
    if unsafe { bpf_xdp_adjust_head(raw, -(outer as i32)) } != 0 {
        return Err(());
    }
    // SAFETY: the context's fields, re-read after the helper moved the data.
    let (data, data_end) = unsafe { ((*raw).data as usize, (*raw).data_end as usize) };
    let moved = Ctx {
        data,
        data_end,
        len: data_end - data,
        ifindex: ctx.ifindex,
        raw: ctx.raw,
        skb: false,
    };
    if v4 {
        write_xdp::<5>(&moved, &buf)
    } else {
        write_xdp::<10>(&moved, &buf)
    }
}

/// Moves the Ethernet header `WORDS * 4` bytes forward and writes the outer
/// header (`WORDS` words of `buf`) behind it.
#[inline(always)]
fn write_xdp<const WORDS: usize>(c: &Ctx, buf: &[u32; 10]) -> Result<(), ()> {
    let outer = WORDS * 4;
    let Some(old_eth) = ptr_at::<[u16; 7]>(c, outer) else {
        return Err(());
    };
    let Some(eth) = ptr_at::<[u16; 7]>(c, 0) else {
        return Err(());
    };
    let Some(hdr) = ptr_at::<[u32; WORDS]>(c, ETH_LEN) else {
        return Err(());
    };
    // SAFETY: all three inside the frame (ptr_at); the Ethernet copy reads
    // the old header before the outer header's words overwrite it.
    unsafe {
        let e = old_eth.read_unaligned();
        eth.write_unaligned(e);
        let h = hdr.cast::<u32>();
        for (i, w) in buf.iter().take(WORDS).enumerate() {
            h.add(i).write_unaligned(*w);
        }
    }
    Ok(())
}

/// TC: the skb helper makes room after the Ethernet header (telling the
/// stack an outer IPv4 or IPv6 header follows, so that a GSO packet is
/// segmented as a tunnel's), and the outer header is stored there.
#[inline(always)]
fn wrap_skb(ctx: &Ctx, r: &EncapRequest, v4: bool, outer: u32) -> Result<(), ()> {
    let inner_len = (ctx.len as u32).wrapping_sub(ETH_LEN as u32);
    let mut buf = [0u32; 10];
    outer_header(&mut buf, r, v4, inner_len);
    let flags = if v4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    };
    let skb = ctx.raw.cast();
    // SAFETY: plain helper calls on this program's skb; `buf` is a local of
    // at least `outer` bytes.
    unsafe {
        if bpf_skb_adjust_room(skb, outer as i32, BPF_ADJ_ROOM_MAC, u64::from(flags)) != 0 {
            return Err(());
        }
        if bpf_skb_store_bytes(skb, ETH_LEN as u32, buf.as_ptr().cast(), outer, 0) != 0 {
            return Err(());
        }
    }
    Ok(())
}
