//! ICMP errors about flows Sluice forwarded: path MTU messages are
//! translated for the client, unreachables count against the backend.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use core::mem;

use agent_common::{
    FAMILY_V4, FLOW_F_FAILURE_COUNTED, FLOW_F_REVERSE, FlowKey, PROTO_TCP, PROTO_UDP, flow_state,
    prefilter,
};

use crate::{
    conntrack::{Table, forward_of},
    csum::Diff,
    failure::{self, Failure},
    headers::{
        ICMP_CHECK_OFFSET, ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, ICMP_HDR_LEN,
        ICMPV6_DEST_UNREACHABLE, ICMPV6_PACKET_TOO_BIG, Ipv4, Ipv6, Ports, TCP_CHECK_OFFSET,
        UDP_CHECK_OFFSET,
    },
    maps::{CONNTRACK, HALF_OPEN, scratch},
    packet::{Action, Ctx, ETH_LEN, copy_addr, ptr_at},
    service::prefilter_hit,
    stats::with_stats,
};

/// ICMP destination-unreachable codes that say the backend (or the way to
/// it) is down: network, host, protocol or port unreachable, network or
/// host unknown. Not "fragmentation needed" (a path MTU), and not the
/// "administratively prohibited" family: a firewall or network policy
/// between one client and the backend says nothing of the backend.
#[inline(always)]
fn means_down_v4(code: u8) -> bool {
    matches!(code, 0 | 1 | 2 | 3 | 6 | 7)
}

/// ICMPv6 destination-unreachable codes that say the backend is down: no
/// route, address unreachable, port unreachable (not "administratively
/// prohibited", "beyond scope", policy failures or reject routes).
#[inline(always)]
fn means_down_v6(code: u8) -> bool {
    matches!(code, 0 | 3 | 4)
}

/// An ICMP error about a flow Sluice forwarded (it quotes the packet as
/// sent to the backend):
/// - "fragmentation needed" / "packet too big" (a link on the way to the
///   backend is narrower than the packet) is for the client, whose path MTU
///   it is: it is translated to quote what the client sent (VIP and ports,
///   checksums fixed; with SNAT also sent to the client) and goes on;
/// - a destination-unreachable whose code means "down" counts against the
///   backend, if it is trustworthy (see `counts_against_backend`); a TCP
///   connect it fails is retried like a refused one.
///
/// The message itself goes on to the kernel, which forwards or takes it.
#[inline(always)]
pub fn error(ctx: &Ctx, l4: usize, family: u8) -> Action {
    // Read as type, code and checksum together: see `ptr_at`.
    let Some(icmp) = ptr_at::<[u8; 4]>(ctx, l4) else {
        return Action::Pass;
    };
    // SAFETY: checked by ptr_at.
    let (icmp_type, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    let (too_big, unreachable, down) = if family == FAMILY_V4 {
        let unreachable = icmp_type == ICMP_DEST_UNREACHABLE;
        (
            unreachable && code == ICMP_FRAG_NEEDED,
            unreachable && code != ICMP_FRAG_NEEDED,
            means_down_v4(code),
        )
    } else {
        (
            icmp_type == ICMPV6_PACKET_TOO_BIG,
            icmp_type == ICMPV6_DEST_UNREACHABLE,
            means_down_v6(code),
        )
    };
    if !too_big && !unreachable {
        return Action::Pass;
    }
    // Where the message ends: a frame may carry padding after it, which is
    // no part of what the message quotes (or of its checksum).
    let msg_end = if family == FAMILY_V4 {
        match ptr_at::<Ipv4>(ctx, ETH_LEN) {
            // SAFETY: checked by ptr_at.
            Some(ip) => ETH_LEN + usize::from(u16::from_be(unsafe { (*ip).tot_len })),
            None => return Action::Pass,
        }
    } else {
        match ptr_at::<Ipv6>(ctx, ETH_LEN) {
            // SAFETY: checked by ptr_at.
            Some(ip) => {
                ETH_LEN
                    + mem::size_of::<Ipv6>()
                    + usize::from(u16::from_be(unsafe { (*ip).payload_len }))
            }
            None => return Action::Pass,
        }
    };
    // The quoted packet: its IP header, then at least 8 bytes of TCP/UDP.
    let inner = l4 + ICMP_HDR_LEN;
    let (proto, src, dst, inner_l4) = if family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4>(ctx, inner) else {
            return Action::Pass;
        };
        // SAFETY: checked by ptr_at.
        let (vihl, ttl_proto, src, dst) =
            unsafe { ((*ip).vihl, (*ip).ttl_proto, (*ip).src, (*ip).dst) };
        let ihl = (vihl & 0x0f) as usize;
        (
            (ttl_proto >> 8) as u8,
            [src, 0, 0, 0],
            [dst, 0, 0, 0],
            inner + ihl * 4,
        )
    } else {
        let Some(ip) = ptr_at::<Ipv6>(ctx, inner) else {
            return Action::Pass;
        };
        // SAFETY: checked by ptr_at.
        let (next, src, dst) = unsafe { ((*ip).next_hdr, (*ip).src, (*ip).dst) };
        (next, src, dst, inner + mem::size_of::<Ipv6>())
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Action::Pass;
    }
    // The ports must be inside the message, not in padding after it.
    if inner_l4 + mem::size_of::<Ports>() > msg_end {
        return Action::Pass;
    }
    let Some(ports) = ptr_at::<Ports>(ctx, inner_l4) else {
        return Action::Pass;
    };
    // SAFETY: checked by ptr_at.
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    if !prefilter_hit(prefilter::BACKEND, &dst, dport, proto) {
        return Action::Pass;
    }
    let Some(s) = scratch() else {
        return Action::Pass;
    };
    // The reply direction's key: from the backend back to the flow's source.
    s.key = FlowKey {
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        proto,
        family,
        _pad: 0,
    };
    // A connect being made is half-open; a flow may be established.
    let (reply, table) = if let Some(reply) = HALF_OPEN.get_ptr_mut(&s.key) {
        (reply, Table::HalfOpen)
    } else if let Some(reply) = CONNTRACK.get_ptr_mut(&s.key) {
        (reply, Table::Established)
    } else {
        return Action::Pass;
    };
    // SAFETY: a live conntrack value.
    let reply = unsafe { &*reply };
    if reply.flags & FLOW_F_REVERSE == 0 {
        return Action::Pass;
    }
    // forward_of leaves the flow's client → VIP key in s.reverse_key.
    let forward = forward_of(s, reply, table);
    if too_big {
        if forward.is_some() {
            quote_as_sent(
                ctx,
                icmp,
                (inner, inner_l4, msg_end),
                family,
                proto,
                &s.key,
                &s.reverse_key,
            );
        }
        return Action::Pass;
    }
    let Some(forward) = forward else {
        return Action::Pass;
    };
    // SAFETY: a live conntrack value.
    let f = unsafe { &mut *forward };
    if !down || !counts_against_backend(ctx, family, f, reply.backend_id, proto, &s.reverse_key.src)
    {
        with_stats(true, f.service_id, |st| st.untrusted_signals += 1);
        return Action::Pass;
    }
    f.flags |= FLOW_F_FAILURE_COUNTED;
    let now = failure::now_ns();
    failure::record_failure(
        &s.reverse_key,
        f.service_id,
        f.backend_id,
        Failure::Unreachable,
        now,
    );
    if proto == PROTO_TCP && failure::retries(f.service_id) {
        f.state = flow_state::REFUSED;
    }
    Action::Pass
}

/// Whether an unreachable about the flow whose forward entry is `f` is the
/// answer to a connect that really went to the backend `backend_id`: the
/// flow is still on that backend and, for TCP, still waiting for its SYN to
/// be answered; no failure was counted for this attempt yet; it arrived on
/// the backend's side; and it doesn't come from the flow's own client
/// (`client`), which could otherwise eject any backend it can reach.
#[inline(always)]
fn counts_against_backend(
    ctx: &Ctx,
    family: u8,
    f: &agent_common::Flow,
    backend_id: u32,
    proto: u8,
    client: &[u32; 4],
) -> bool {
    if f.backend_id != backend_id
        || f.flags & FLOW_F_FAILURE_COUNTED != 0
        || (proto == PROTO_TCP && f.state != flow_state::SYN_SENT)
        || !failure::from_backend_side(ctx.ifindex, backend_id, &f.new_dst)
    {
        return false;
    }
    let from_client = if family == FAMILY_V4 {
        match ptr_at::<Ipv4>(ctx, ETH_LEN) {
            // SAFETY: inside the packet (ptr_at).
            Some(ip) => (unsafe { (*ip).src }) == client[0],
            None => true,
        }
    } else {
        match ptr_at::<Ipv6>(ctx, ETH_LEN) {
            // SAFETY: inside the packet (ptr_at).
            Some(ip) => (unsafe { (*ip).src }) == *client,
            None => true,
        }
    };
    !from_client
}

/// Rewrites an ICMP error (`icmp`: its type, code and checksum) whose quoted
/// packet (offsets: IP header, TCP/UDP header, the message's end) went to a
/// backend, so that it quotes the
/// packet as the client sent it (`original`: client → VIP) and goes to the
/// client. `reply` is the reply entry's key (backend → the quoted source).
/// The quoted IPv4 header checksum, the quoted L4 checksum (when quoted), the
/// outer destination and the ICMP checksum are all fixed incrementally.
#[inline(always)]
fn quote_as_sent(
    ctx: &Ctx,
    icmp: *mut [u8; 4],
    (inner, inner_l4, msg_end): (usize, usize, usize),
    family: u8,
    proto: u8,
    reply: &FlowKey,
    original: &FlowKey,
) {
    // As quoted: from the reply entry's destination to its source.
    let addrs = Diff::default()
        .addr(&reply.dst, &original.src)
        .addr(&reply.src, &original.dst);
    let segment = addrs
        .word16(reply.dport, original.sport)
        .word16(reply.sport, original.dport);
    // What changes inside the ICMP message (its checksum covers it).
    let mut message = addrs;
    if family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4>(ctx, inner) else {
            return;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            let old = (*ip).check;
            let new = addrs.apply(old);
            (*ip).src = original.src[0];
            (*ip).dst = original.dst[0];
            (*ip).check = new;
            message = message.word16(old, new);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6>(ctx, inner) else {
            return;
        };
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            copy_addr(&mut (*ip).src, &original.src);
            copy_addr(&mut (*ip).dst, &original.dst);
        }
    }
    // The ports, if the message quotes them.
    if inner_l4 + mem::size_of::<Ports>() <= msg_end
        && let Some(ports) = ptr_at::<Ports>(ctx, inner_l4)
    {
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            (*ports).src = original.sport;
            (*ports).dst = original.dport;
        }
        message = message
            .word16(reply.dport, original.sport)
            .word16(reply.sport, original.dport);
    }
    let check_at = if proto == PROTO_TCP {
        inner_l4 + TCP_CHECK_OFFSET
    } else {
        inner_l4 + UDP_CHECK_OFFSET
    };
    // Quoted only when the error quotes enough of the segment.
    if check_at + 2 <= msg_end
        && let Some(check) = ptr_at::<u16>(ctx, check_at)
    {
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            let old = *check;
            if !(proto == PROTO_UDP && family == FAMILY_V4 && old == 0) {
                let new = segment.apply(old);
                let new = if proto == PROTO_UDP && new == 0 {
                    0xffff
                } else {
                    new
                };
                *check = new;
                message = message.word16(old, new);
            }
        }
    }
    // The error was sent to the quoted packet's source: with SNAT that is
    // this host; now it is the client.
    if family == FAMILY_V4 {
        if let Some(ip) = ptr_at::<Ipv4>(ctx, ETH_LEN) {
            // SAFETY: inside the packet (ptr_at).
            unsafe {
                let old = (*ip).dst;
                (*ip).dst = original.src[0];
                (*ip).check = Diff::default()
                    .word32(old, original.src[0])
                    .apply((*ip).check);
            }
        }
    } else if let Some(ip) = ptr_at::<Ipv6>(ctx, ETH_LEN) {
        // SAFETY: inside the packet (ptr_at). ICMPv6 sums the pseudo-header.
        unsafe {
            message = message.addr(&(*ip).dst, &original.src);
            copy_addr(&mut (*ip).dst, &original.src);
        }
    }
    // Through the pointer `error` checked: LLVM drops a second bounds
    // check it can prove redundant, and the verifier would then see an
    // unchecked pointer.
    // SAFETY: the checksum is bytes 2..4 of the 4 bytes checked at `icmp`.
    unsafe {
        let check = icmp.cast::<u8>().add(ICMP_CHECK_OFFSET).cast::<u16>();
        check.write_unaligned(message.apply(check.read_unaligned()));
    }
}
