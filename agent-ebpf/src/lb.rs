//! The load-balancing pipeline, shared by the XDP and TC entry points:
//! parse → find the service (or the reverse-NAT entry) → pick or recall the
//! backend → rewrite → forward by FIB lookup.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use core::{ffi::c_void, mem};

use agent_common::{
    Backend, FAMILY_V4, FAMILY_V6, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT, FLOW_F_REVERSE, Flow,
    FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP, SERVICE_F_RETRY, SERVICE_F_SNAT, SNAT_PORT_ATTEMPTS,
    SNAT_PORT_MAX, SNAT_PORT_MIN, Service, ServiceKey, event_kind, flow_state, hash, prefilter,
    reason,
};
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, bpf_fib_lookup},
    helpers::{bpf_ktime_get_coarse_ns, bpf_l4_csum_replace},
};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    csum::Diff,
    events,
    fib::{self, forward},
    headers::{
        ICMP_CHECK_OFFSET, ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, ICMP_HDR_LEN,
        ICMPV6_DEST_UNREACHABLE, ICMPV6_PACKET_TOO_BIG, IPV4_FRAG_MASK_BE, IPV4_OFFSET_MASK_BE,
        IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING, Ipv4, Ipv6, Ipv6Fragment,
        PROTO_ICMP, PROTO_ICMPV6, Ports, TCP_ACK, TCP_CHECK_OFFSET, TCP_FIN, TCP_FLAGS_OFFSET,
        TCP_HDR_LEN, TCP_RST, TCP_SYN, UDP_CHECK_OFFSET, UDP_HDR_LEN, is_ipv6_extension,
    },
    health::{self, Failure},
    maps::{
        BACKEND_FIB, BACKEND_STATS, BACKENDS, CONNTRACK, FRAGMENTS, PREFILTER, REASONS, SCRATCH,
        SERVICE_STATS, SERVICES, SNAT_CURSOR,
    },
};

/// What the entry point should do with the packet.
pub enum Action {
    Pass,
    Drop,
    /// Send back out of the interface it came in on.
    Tx,
    /// Send out of another interface.
    Redirect(u32),
}

/// The packet as the entry point hands it over.
pub struct Ctx {
    pub data: usize,
    pub data_end: usize,
    /// The whole packet's length. For TC only the headers need to be in the
    /// linear part (`data..data_end`); the rest may be paged.
    pub len: usize,
    pub ifindex: u32,
    /// The program's context (`xdp_md` or `__sk_buff`) for helpers.
    pub raw: *mut c_void,
    /// TC: `raw` is an skb, whose L4 checksum may be partial (local senders,
    /// veth, containers) and is fixed by the skb checksum helper. A constant
    /// per entry point, so each program keeps only its own branch.
    pub skb: bool,
}

impl aya_ebpf::EbpfContext for Ctx {
    fn as_ptr(&self) -> *mut c_void {
        self.raw
    }
}

/// Where an IP packet carrying TCP or UDP keeps its headers. Its 5-tuple is
/// in the per-CPU scratch area (`Scratch::key`), not on the stack.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// End of the IP datagram according to its own length field.
    pub ip_end: usize,
    /// `Fragment::*`: whether the datagram is a fragment, and which.
    pub fragment: u8,
    /// The IP identification of a fragment (IPv4's 16 bits, IPv6's 32).
    pub id: u32,
}

/// Where a packet stands in its datagram. Only the first fragment carries
/// the ports; later ones follow it by the ports `FRAGMENTS` remembers for
/// (source, destination, identification, protocol), as Cilium does.
pub mod fragment {
    /// Not a fragment.
    pub const NONE: u8 = 0;
    /// Offset 0, more to come: has the L4 header.
    pub const FIRST: u8 = 1;
    /// No L4 header: addresses are rewritten, nothing else.
    pub const LATER: u8 = 2;
}

/// Key of `FRAGMENTS`.
#[repr(C)]
pub struct FragmentKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Extension headers parsed in front of an IPv6 packet's TCP/UDP header.
const MAX_IPV6_EXTENSIONS: u32 = 4;

/// The largest L4 offset the pipeline reads at (a mask: see `settle`).
const MAX_L4_OFFSET: usize = 0x1ff;

/// Passes the parse result (L4 offset, fragment kind, identification)
/// through the scratch area. Each way through the headers (IPv4 fragment or
/// not, each number of IPv6 extension headers) leaves different constants in
/// the verifier's state, and the rest of the pipeline, far larger than the
/// parsing, would be verified once for each; read back from memory they are
/// one unknown, so it is verified once.
#[inline(always)]
///
/// Returns the scratch area too: the rest of the pipeline works in it.
fn settle(l4: usize, fragment: u8, id: u32) -> Option<(&'static mut Scratch, usize, u8, u32)> {
    let s = scratch()?;
    let p = &raw mut s.parsed;
    // SAFETY: this CPU's scratch slot (see `Scratch`); volatile, so the
    // values really go through memory.
    unsafe {
        core::ptr::write_volatile(&raw mut (*p)[0], l4 as u32);
        core::ptr::write_volatile(&raw mut (*p)[1], u32::from(fragment));
        core::ptr::write_volatile(&raw mut (*p)[2], id);
        let settled = (
            core::ptr::read_volatile(&raw const (*p)[0]) as usize & MAX_L4_OFFSET,
            (core::ptr::read_volatile(&raw const (*p)[1]) & 3) as u8,
            core::ptr::read_volatile(&raw const (*p)[2]),
        );
        Some((s, settled.0, settled.1, settled.2))
    }
}

/// Big values the pipeline builds, kept in a per-CPU map: the BPF stack (512
/// bytes over all frames) can't hold them all. XDP and TC programs run in
/// softirq context and never nest on one CPU, so one area per CPU suffices.
#[repr(C)]
pub struct Scratch {
    /// The packet's 5-tuple, as it arrived.
    pub key: FlowKey,
    pub service_key: ServiceKey,
    pub reverse_key: FlowKey,
    pub forward: Flow,
    pub reverse: Flow,
    /// The forward key of a flow whose SNAT port may be taken over.
    pub old_key: FlowKey,
    pub fragment_key: FragmentKey,
    /// Where parsing left off (see `settle`).
    pub parsed: [u32; 4],
    pub fib: bpf_fib_lookup,
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do
    // (see `Scratch`), so the exclusive reference is unique.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

pub(crate) const ETH_LEN: usize = mem::size_of::<EthHdr>();

/// Copies an address word by word. A plain array copy between two places
/// LLVM can't prove apart becomes a memmove call: a byte loop in BPF code.
#[inline(always)]
pub(crate) fn copy_addr(dst: &mut [u32; 4], src: &[u32; 4]) {
    let (a, b, c, d) = (src[0], src[1], src[2], src[3]);
    // SAFETY: writes through a valid &mut; volatile only to keep LLVM from
    // fusing the four stores back into a memmove.
    unsafe {
        core::ptr::write_volatile(&mut dst[0], a);
        core::ptr::write_volatile(&mut dst[1], b);
        core::ptr::write_volatile(&mut dst[2], c);
        core::ptr::write_volatile(&mut dst[3], d);
    }
}

/// A pointer to a `T` at `offset` in the packet, if it lies inside.
///
/// Don't ask for a single byte at a variable offset: LLVM turns
/// `start + 1 > end` into `start >= end`, from which the verifier learns
/// nothing about the byte. Read a wider word instead.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &Ctx, offset: usize) -> Option<*mut T> {
    let start = ctx.data + offset;
    if start + mem::size_of::<T>() > ctx.data_end {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn count(code: u32) {
    if let Some(n) = REASONS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot, no other writer while this program runs here.
        unsafe { *n += 1 };
    }
}

/// Counts the reason and applies its fixed action.
#[inline(always)]
pub(crate) fn exception(code: u32) -> Action {
    count(code);
    if reason::DROPPED_MASK & (1 << (code & 31)) != 0 {
        Action::Drop
    } else {
        Action::Pass
    }
}

#[inline(always)]
fn prefilter_hit(slot: u32, addr: &[u32; 4], port: u16, proto: u8) -> bool {
    let bit = hash::prefilter_bit(addr, port, proto);
    match PREFILTER.get(slot) {
        Some(bitmap) => bitmap.words[(bit >> 6) as usize] & (1 << (bit & 63)) != 0,
        None => false,
    }
}

/// A packet Sluice can't parse far enough to look it up exactly. It passes
/// untouched: a prefilter hit (the address may be a VIP's or a backend's)
/// only decides whether it is counted, never whether it is dropped. Drops
/// come after an exact service or conntrack lookup (`validate`).
#[inline(always)]
fn unhandled(src: &[u32; 4], dst: &[u32; 4], code: u32) -> Action {
    if prefilter_hit(prefilter::SERVICE_ADDR, dst, 0, 0)
        || prefilter_hit(prefilter::BACKEND_ADDR, src, 0, 0)
    {
        count(code);
    }
    Action::Pass
}

#[inline(always)]
pub fn process(ctx: &Ctx) -> Action {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return exception(reason::SHORT_FRAME);
    };
    // SAFETY: ptr_at checked the header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        ipv4(ctx)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(ctx)
    } else if ether_type == EtherType::Ieee8021q as u16
        || ether_type == EtherType::Ieee8021ad as u16
    {
        exception(reason::VLAN_TAGGED)
    } else {
        Action::Pass
    }
}

#[inline(always)]
fn ipv4(ctx: &Ctx) -> Action {
    let Some(ip) = ptr_at::<Ipv4>(ctx, ETH_LEN) else {
        return exception(reason::SHORT_FRAME);
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
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMP && frag_off & IPV4_FRAG_MASK_BE == 0 {
            return icmp_error(ctx, ETH_LEN + (vihl & 0x0f) as usize * 4, FAMILY_V4);
        }
        return Action::Pass;
    }
    let src = [src, 0, 0, 0];
    let dst = [dst, 0, 0, 0];
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return unhandled(&src, &dst, reason::MALFORMED);
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
    let Some((s, l4, fragment, id)) = settle(ETH_LEN + ihl * 4, fragment, id) else {
        return Action::Pass;
    };
    let pkt = Packet {
        family: FAMILY_V4,
        proto,
        l3: ETH_LEN,
        l4,
        ip_end: ETH_LEN + u16::from_be(tot_len) as usize,
        fragment,
        id,
    };
    transport(ctx, s, &pkt, &src, &dst)
}

#[inline(always)]
fn ipv6(ctx: &Ctx) -> Action {
    let Some(ip) = ptr_at::<Ipv6>(ctx, ETH_LEN) else {
        return exception(reason::SHORT_FRAME);
    };
    // SAFETY: the IPv6 header is inside the packet (checked above).
    let (mut next, src, dst, payload_len) =
        unsafe { ((*ip).next_hdr, (*ip).src, (*ip).dst, (*ip).payload_len) };
    let ip_end = ETH_LEN + mem::size_of::<Ipv6>() + u16::from_be(payload_len) as usize;
    // Extension headers in front of TCP/UDP: hop-by-hop, routing and
    // destination options are stepped over; a fragment header says which
    // part of the datagram this is.
    let mut l4 = ETH_LEN + mem::size_of::<Ipv6>();
    let (mut fragment, mut id) = (fragment::NONE, 0);
    let mut parsed = 0;
    while parsed < MAX_IPV6_EXTENSIONS {
        if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS {
            // Next header and length together: see `ptr_at`.
            let Some(ext) = ptr_at::<[u8; 2]>(ctx, l4) else {
                return unhandled(&src, &dst, reason::MALFORMED);
            };
            // SAFETY: checked by ptr_at.
            let (n, len) = unsafe { ((*ext)[0], (*ext)[1]) };
            next = n;
            l4 += (usize::from(len) + 1) * 8;
        } else if next == IPV6_FRAGMENT {
            let Some(f) = ptr_at::<Ipv6Fragment>(ctx, l4) else {
                return unhandled(&src, &dst, reason::MALFORMED);
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
            return unhandled(&src, &dst, reason::IPV6_EXTENSION);
        }
        if next == PROTO_ICMPV6 && fragment == fragment::NONE {
            return icmp_error(ctx, l4, FAMILY_V6);
        }
        return Action::Pass;
    }
    if l4 > MAX_L4_OFFSET {
        // Extension headers this long are no load balancer's traffic.
        return unhandled(&src, &dst, reason::IPV6_EXTENSION);
    }
    let Some((s, l4, fragment, id)) = settle(l4, fragment, id) else {
        return Action::Pass;
    };
    let pkt = Packet {
        family: FAMILY_V6,
        proto: next,
        l3: ETH_LEN,
        l4,
        ip_end,
        fragment,
        id,
    };
    transport(ctx, s, &pkt, &src, &dst)
}

/// Reads the ports and decides whether the packet is for a service, a reply
/// to reverse-NAT, or not ours.
#[inline(always)]
fn transport(ctx: &Ctx, s: &mut Scratch, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) -> Action {
    let (sport, dport) = if pkt.fragment == fragment::LATER {
        fragment_key(s, pkt, src, dst);
        match FRAGMENTS.get_ptr(&s.fragment_key) {
            // SAFETY: a live map value, copied out at once.
            Some(ports) => unsafe { ((*ports).src, (*ports).dst) },
            // Its first fragment wasn't seen (or wasn't ours).
            None => return unhandled(src, dst, reason::FRAGMENT),
        }
    } else {
        let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4) else {
            return unhandled(src, dst, reason::MALFORMED);
        };
        // SAFETY: checked by ptr_at.
        unsafe { ((*ports).src, (*ports).dst) }
    };

    let to_service = prefilter_hit(prefilter::SERVICE, dst, dport, pkt.proto);
    if !to_service && !prefilter_hit(prefilter::BACKEND, src, sport, pkt.proto) {
        return Action::Pass;
    }
    if pkt.fragment == fragment::FIRST {
        // The later fragments will need these ports.
        fragment_key(s, pkt, src, dst);
        let ports = Ports {
            src: sport,
            dst: dport,
        };
        let _ = FRAGMENTS.insert(&s.fragment_key, &ports, 0);
    }
    s.key = FlowKey {
        src: *src,
        dst: *dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    };
    // An established flow needs only its conntrack entry, in either direction.
    if let Some(flow) = CONNTRACK.get_ptr_mut(&s.key) {
        if let Err(code) = validate(ctx, pkt) {
            return exception(code);
        }
        // SAFETY: a live conntrack value, not aliased by the scratch area.
        let f = unsafe { &mut *flow };
        let now = now_seconds();
        // Written only when it changes: a store per packet would bounce the
        // entry's cache line between CPUs for nothing.
        if f.last_seen != now {
            f.last_seen = now;
        }
        if pkt.proto == PROTO_TCP && pkt.fragment != fragment::LATER {
            let flags = tcp_flags(ctx, pkt);
            let verdict = if f.flags & FLOW_F_REVERSE == 0 {
                client_tcp(s, f, flags)
            } else {
                backend_tcp(s, f, flags)
            };
            if let Err(code) = verdict {
                return exception(code);
            }
        }
        return translate(ctx, pkt, &s.key, &mut s.fib, flow);
    }
    if !to_service {
        return Action::Pass;
    }
    s.service_key = ServiceKey {
        addr: *dst,
        port: dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: copied out at once; the agent replaces, never edits, entries.
    let Some(service) = (unsafe { SERVICES.get(&s.service_key) }).copied() else {
        return Action::Pass;
    };
    if let Err(code) = validate(ctx, pkt) {
        return exception(code);
    }
    // A connection starts with a SYN (or any UDP datagram); a mid-stream
    // packet without an entry (evicted, or from before a restart) is
    // re-pinned by the same Maglev choice but is not a new connection.
    let flags = if pkt.proto == PROTO_TCP && pkt.fragment != fragment::LATER {
        tcp_flags(ctx, pkt)
    } else {
        0
    };
    let syn = pkt.proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    match new_flow(s, &service, syn, flags) {
        Ok(flow) => {
            if syn || pkt.proto == PROTO_UDP {
                // SAFETY: the scratch copy of the new entry.
                let backend_id = unsafe { (*flow).backend_id };
                health::count_connection(service.id, backend_id);
                if pkt.proto == PROTO_UDP {
                    let now = health::now_ns();
                    events::emit(event_kind::OPEN, 0, &s.key, service.id, backend_id, 0, now);
                }
            }
            translate(ctx, pkt, &s.key, &mut s.fib, flow)
        }
        Err(code) => {
            log_refused_flow(ctx, service.id, code);
            exception(code)
        }
    }
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

/// A TCP packet from the client on a known flow: SYN retransmissions
/// (timeouts, retries after a refusal, a reused 5-tuple) and closes.
#[inline(always)]
fn client_tcp(s: &mut Scratch, f: &mut Flow, flags: u8) -> Result<(), u32> {
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        if flags & (TCP_FIN | TCP_RST) != 0 {
            close_seen(&s.key, f, flags, FLOW_F_FIN_CLIENT);
        }
        return Ok(());
    }
    match f.state {
        flow_state::SYN_SENT => {
            let now = health::now_ns();
            let Some(policy) = health::policy(f.service_id) else {
                return Ok(());
            };
            if now.wrapping_sub(f.syn_ns) < policy.connect_timeout_ns {
                return Ok(()); // an early retransmission: same backend
            }
            health::record_failure(&s.key, f.service_id, f.backend_id, Failure::Timeout, now);
            if policy.flags & SERVICE_F_RETRY != 0 {
                retry(s, f, now, Resend::AfterFailure)
            } else {
                f.syn_ns = now;
                Ok(())
            }
        }
        flow_state::REFUSED => retry(s, f, health::now_ns(), Resend::AfterFailure),
        flow_state::CLOSED | flow_state::CLOSING | flow_state::UNKNOWN => {
            // The 5-tuple is reused by a new connection (or a flow picked up
            // mid-stream starts over): it starts afresh, on the same backend
            // if that is still healthy and in the service, else where a new
            // flow would go. A new connection, not a retry.
            f.state = flow_state::SYN_SENT;
            f.flags &= !(FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND);
            f.syn_ns = health::now_ns();
            if health::is_ejected(f.backend_id) {
                retry(s, f, f.syn_ns, Resend::NewConnection)?;
            }
            health::count_connection(f.service_id, f.backend_id);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A TCP packet from the backend: SYN-ACK (success, latency), RST to a SYN
/// (refused: held back when the service retries), and closes. Returns an
/// error code when the packet must not be forwarded.
#[inline(always)]
fn backend_tcp(s: &mut Scratch, reply: &Flow, flags: u8) -> Result<(), u32> {
    if flags & (TCP_SYN | TCP_RST | TCP_FIN) == 0 {
        return Ok(()); // data and ACKs: the fast path
    }
    let Some(forward) = forward_of(s, reply) else {
        return Ok(());
    };
    // SAFETY: a live conntrack value.
    let f = unsafe { &mut *forward };
    if f.backend_id != reply.backend_id {
        return Ok(()); // a late packet from a backend the flow has left
    }
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        if f.state == flow_state::SYN_SENT {
            let now = health::now_ns();
            let latency = now.wrapping_sub(f.syn_ns);
            health::record_success(&s.reverse_key, f.service_id, f.backend_id, latency, now);
            f.state = flow_state::ESTABLISHED;
        }
        return Ok(());
    }
    if flags & TCP_RST != 0 && f.state == flow_state::SYN_SENT {
        let now = health::now_ns();
        health::record_failure(
            &s.reverse_key,
            f.service_id,
            f.backend_id,
            Failure::Refused,
            now,
        );
        let retries = health::policy(f.service_id).is_some_and(|p| p.flags & SERVICE_F_RETRY != 0);
        if retries {
            // Nothing has flowed yet: the client's retransmitted SYN will go
            // to another backend, so it must not see this refusal.
            f.state = flow_state::REFUSED;
            return Err(reason::RST_HELD_FOR_RETRY);
        }
        f.state = flow_state::CLOSED;
        return Ok(());
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        close_seen(&s.reverse_key, f, flags, FLOW_F_FIN_BACKEND);
    }
    Ok(())
}

/// A FIN or RST from one side (`side`: its `FLOW_F_FIN_*` bit) of the flow
/// whose forward entry is `f`, keyed `key`. The first one ends the
/// connection for the counters; the flow is closed (TIME_WAIT for the
/// sweep, its SNAT port free to take) after FINs from both sides or a RST.
#[inline(always)]
fn close_seen(key: &FlowKey, f: &mut Flow, flags: u8, side: u32) {
    let rst = flags & TCP_RST != 0;
    match f.state {
        flow_state::ESTABLISHED => {
            health::count_close(key, f.service_id, f.backend_id, f.syn_ns);
        }
        flow_state::CLOSING | flow_state::UNKNOWN => {}
        _ => return,
    }
    f.flags |= side;
    let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
    f.state = if rst || f.flags & both == both {
        flow_state::CLOSED
    } else {
        flow_state::CLOSING
    };
}

/// Seconds of the coarse monotonic clock: cheap enough for every packet.
#[inline(always)]
fn now_seconds() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// The forward entry of the flow whose reply entry is `reply`. The state
/// lives there; its key is the reply's rewrite turned around (client → VIP).
#[inline(always)]
fn forward_of(s: &mut Scratch, reply: &Flow) -> Option<*mut Flow> {
    answer_key(&mut s.reverse_key, reply, s.key.proto, s.key.family);
    CONNTRACK.get_ptr_mut(&s.reverse_key)
}

/// The 5-tuple of the packets that answer those `flow` rewrites: its new
/// destination and source, turned around. (The forward entry's answer is the
/// reply direction, and the reply entry's answer is the forward direction.)
#[inline(always)]
fn answer_key(key: &mut FlowKey, flow: &Flow, proto: u8, family: u8) {
    copy_addr(&mut key.src, &flow.new_dst);
    copy_addr(&mut key.dst, &flow.new_src);
    key.sport = flow.new_dport;
    key.dport = flow.new_sport;
    key.proto = proto;
    key.family = family;
    key._pad = 0;
}

/// An ICMP error about a flow Sluice forwarded (it quotes the packet as
/// sent to the backend):
/// - "fragmentation needed" / "packet too big" (a link on the way to the
///   backend is narrower than the packet) is for the client, whose path MTU
///   it is: it is translated to quote what the client sent (VIP and ports,
///   checksums fixed; with SNAT also sent to the client) and goes on;
/// - another destination-unreachable counts against the backend; a TCP
///   connect it fails is retried like a refused one.
///
/// The message itself goes on to the kernel, which forwards or takes it.
#[inline(always)]
fn icmp_error(ctx: &Ctx, l4: usize, family: u8) -> Action {
    // Read as type, code and checksum together: see `ptr_at`.
    let Some(icmp) = ptr_at::<[u8; 4]>(ctx, l4) else {
        return Action::Pass;
    };
    // SAFETY: checked by ptr_at.
    let (icmp_type, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    let (too_big, unreachable) = if family == FAMILY_V4 {
        let unreachable = icmp_type == ICMP_DEST_UNREACHABLE;
        (
            unreachable && code == ICMP_FRAG_NEEDED,
            unreachable && code != ICMP_FRAG_NEEDED,
        )
    } else {
        (
            icmp_type == ICMPV6_PACKET_TOO_BIG,
            icmp_type == ICMPV6_DEST_UNREACHABLE,
        )
    };
    if !too_big && !unreachable {
        return Action::Pass;
    }
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
    let Some(reply) = CONNTRACK.get_ptr_mut(&s.key) else {
        return Action::Pass;
    };
    // SAFETY: a live conntrack value.
    let reply = unsafe { &*reply };
    if reply.flags & FLOW_F_REVERSE == 0 {
        return Action::Pass;
    }
    // forward_of leaves the flow's client → VIP key in s.reverse_key.
    let forward = forward_of(s, reply);
    if too_big {
        if forward.is_some() {
            quote_as_sent(
                ctx,
                icmp,
                inner,
                inner_l4,
                family,
                proto,
                &s.key,
                &s.reverse_key,
            );
        }
        return Action::Pass;
    }
    let now = health::now_ns();
    health::record_failure(
        &s.reverse_key,
        reply.service_id,
        reply.backend_id,
        Failure::Unreachable,
        now,
    );
    if proto == PROTO_TCP
        && let Some(forward) = forward
    {
        // SAFETY: a live conntrack value.
        let f = unsafe { &mut *forward };
        let retries = health::policy(f.service_id).is_some_and(|p| p.flags & SERVICE_F_RETRY != 0);
        if f.state == flow_state::SYN_SENT && f.backend_id == reply.backend_id && retries {
            f.state = flow_state::REFUSED;
        }
    }
    Action::Pass
}

/// Rewrites an ICMP error (`icmp`: its type, code and checksum) whose quoted packet (IP header at
/// `inner`, TCP/UDP at `inner_l4`) went to a backend, so that it quotes the
/// packet as the client sent it (`original`: client → VIP) and goes to the
/// client. `reply` is the reply entry's key (backend → the quoted source).
/// The quoted IPv4 header checksum, the quoted L4 checksum (when quoted), the
/// outer destination and the ICMP checksum are all fixed incrementally.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "offsets found by the caller's parse"
)]
fn quote_as_sent(
    ctx: &Ctx,
    icmp: *mut [u8; 4],
    inner: usize,
    inner_l4: usize,
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
    let mut message = segment;
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
    if let Some(ports) = ptr_at::<Ports>(ctx, inner_l4) {
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            (*ports).src = original.sport;
            (*ports).dst = original.dport;
        }
    }
    let check_at = if proto == PROTO_TCP {
        inner_l4 + TCP_CHECK_OFFSET
    } else {
        inner_l4 + UDP_CHECK_OFFSET
    };
    // Quoted only when the error quotes enough of the segment.
    if let Some(check) = ptr_at::<u16>(ctx, check_at) {
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
    // Through the pointer `icmp_error` checked: LLVM drops a second bounds
    // check it can prove redundant, and the verifier would then see an
    // unchecked pointer.
    // SAFETY: the checksum is bytes 2..4 of the 4 bytes checked at `icmp`.
    unsafe {
        let check = icmp.cast::<u8>().add(ICMP_CHECK_OFFSET).cast::<u16>();
        check.write_unaligned(message.apply(check.read_unaligned()));
    }
}

/// Why a flow's SYN goes to another backend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Its backend refused or timed out: a retry, counted as one; the
    /// rehashes go on from the flow's last attempt.
    AfterFailure,
    /// A new connection on a reused 5-tuple whose backend may take no new
    /// connections: the choice a new flow would make (same on every node).
    NewConnection,
}

/// Sends the flow (whose SYN is being forwarded now) to another backend:
/// the next healthy choice after the current one. If there is none, the SYN
/// goes to the same backend again.
#[inline(always)]
fn retry(s: &mut Scratch, f: &mut Flow, now: u64, why: Resend) -> Result<(), u32> {
    copy_addr(&mut s.service_key.addr, &s.key.dst);
    s.service_key.port = s.key.dport;
    s.service_key.proto = s.key.proto;
    s.service_key.family = s.key.family;
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(&s.service_key) }).copied() else {
        return Ok(());
    };
    let key = &s.key;
    let h = hash::flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
    let first = match why {
        Resend::AfterFailure => u32::from(f.attempts) + 1,
        Resend::NewConnection => 0,
    };
    let Some((backend_id, attempt)) = health::pick(&service, h, f.backend_id, first) else {
        f.syn_ns = now;
        f.state = flow_state::SYN_SENT;
        return Ok(());
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Ok(());
    };
    // The old reply entry goes; the new backend's comes (with SNAT it keeps
    // the flow's port when that is free towards the new backend).
    answer_key(&mut s.reverse_key, f, s.key.proto, s.key.family);
    let _ = CONNTRACK.remove(&s.reverse_key);
    // Seeded with the current port's offset: the same port is tried first.
    let seed = u32::from(u16::from_be(f.new_sport)).wrapping_sub(u32::from(SNAT_PORT_MIN));
    let new_sport = install_reverse(s, &service, backend_id, backend, seed)?;
    copy_addr(&mut f.new_dst, &backend.addr);
    f.new_dport = backend.port;
    f.new_sport = new_sport;
    f.backend_id = backend_id;
    f.attempts = attempt.min(255) as u8;
    f.state = flow_state::SYN_SENT;
    f.syn_ns = now;
    if why == Resend::AfterFailure {
        health::count_retry(&s.key, service.id, backend_id, now);
    }
    Ok(())
}

/// A connection Sluice could not open is worth a log line (via aya-log into
/// the agent's log); the ring buffer drops records under a flood, the
/// per-reason counters still count every packet.
#[inline(always)]
fn log_refused_flow(ctx: &Ctx, service_id: u32, code: u32) {
    match code {
        reason::NO_BACKEND => {
            aya_log_ebpf::warn!(ctx, "service #{}: new flow dropped: no backend", service_id)
        }
        reason::CONNTRACK_FULL => {
            aya_log_ebpf::warn!(
                ctx,
                "service #{}: new flow dropped: conntrack full",
                service_id
            )
        }
        reason::SNAT_PORTS_EXHAUSTED => aya_log_ebpf::warn!(
            ctx,
            "service #{}: new flow dropped: no free SNAT port",
            service_id
        ),
        _ => {}
    }
}

/// Lengths checked only for packets we are about to rewrite.
#[inline(always)]
fn validate(ctx: &Ctx, pkt: &Packet) -> Result<(), u32> {
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

#[inline(always)]
fn tcp_flags(ctx: &Ctx, pkt: &Packet) -> u8 {
    // The data offset byte and the flags byte as one word: see `ptr_at`.
    match ptr_at::<u16>(ctx, pkt.l4 + TCP_FLAGS_OFFSET - 1) {
        // SAFETY: checked by ptr_at. The flags are the word's second byte.
        Some(word) => (u16::from_be(unsafe { word.read_unaligned() }) & 0xff) as u8,
        None => 0,
    }
}

/// Rewrites the packet as its flow entry says (either direction), counts it,
/// and forwards it. `flow` is a conntrack value or the scratch copy of a new
/// one; `key` and `params` are other parts of the scratch area.
#[inline(always)]
fn translate(
    ctx: &Ctx,
    pkt: &Packet,
    key: &FlowKey,
    params: &mut bpf_fib_lookup,
    flow: *mut Flow,
) -> Action {
    // SAFETY: `flow` is valid and aliases neither `key` nor `params`.
    let f = unsafe { &mut *flow };
    // Before any rewrite: the kernel's ICMP time-exceeded must quote the
    // packet the client sent.
    if !fib::ttl_allows_forwarding(ctx, pkt) {
        return exception(reason::TTL_EXCEEDED);
    }
    let l4_change = rewrite(
        ctx,
        pkt,
        key,
        &f.new_src,
        f.new_sport,
        &f.new_dst,
        f.new_dport,
    );
    let to_backend = f.flags & FLOW_F_REVERSE == 0;
    account(f.service_id, f.backend_id, to_backend, ctx);
    // Towards a backend the next hop depends on the backend alone: one cached
    // FIB result per backend serves all its flows, new ones included, as long
    // as the slot is still that backend's (the agent reuses ids). Towards a
    // client, and for a flow whose backend id was reused, it is the flow's own.
    let cache = match BACKEND_FIB.get_ptr_mut(f.backend_id) {
        // SAFETY: an array slot; concurrent writers store the same result.
        Some(slot) if to_backend && unsafe { (*slot).dst == f.new_dst } => unsafe {
            &mut (*slot).fib
        },
        _ => &mut f.fib,
    };
    let action = forward(ctx, pkt, params, &f.new_src, &f.new_dst, cache);
    if ctx.skb && pkt.fragment != fragment::LATER {
        // Last: the helper may move the packet, which ends direct access.
        skb_l4_checksum(ctx, pkt, l4_change);
    }
    action
}

/// The L4 checksum change of a rewrite that `rewrite` left to the skb
/// helper (TC): the address part belongs to the pseudo-header, the ports to
/// the segment itself.
#[derive(Clone, Copy)]
struct L4Change {
    addrs: Diff,
    ports: Diff,
}

/// Applies `change` with `bpf_l4_csum_replace`, which knows what the packet
/// bytes can't say: with `CHECKSUM_PARTIAL` (a local sender's packet, a veth,
/// a GSO super-packet) the field holds the pseudo-header sum and only the
/// address change applies; otherwise the whole change does, and a
/// `CHECKSUM_COMPLETE` sum is kept right.
#[inline(always)]
fn skb_l4_checksum(ctx: &Ctx, pkt: &Packet, change: L4Change) {
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

/// Picks the backend by Maglev (skipping ejected ones), records both
/// directions of the flow, and returns the forward entry (its copy in the
/// scratch area).
#[inline(always)]
fn new_flow(s: &mut Scratch, service: &Service, syn: bool, flags: u8) -> Result<*mut Flow, u32> {
    let key = &s.key;
    let h = hash::flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
    let Some((backend_id, attempt)) = health::pick(service, h, NO_BACKEND, 0) else {
        return Err(reason::NO_BACKEND);
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Err(reason::NO_BACKEND);
    };
    let seed = if service.flags & SERVICE_F_SNAT != 0 {
        snat_seed()
    } else {
        0
    };
    let new_sport = install_reverse(s, service, backend_id, backend, seed)?;

    let (forward, key) = (&mut s.forward, &s.key);
    let snat = service.flags & SERVICE_F_SNAT != 0;
    let new_src = if snat { &service.snat_addr } else { &key.src };
    fill(
        forward,
        new_src,
        new_sport,
        &backend.addr,
        backend.port,
        backend_id,
        service.id,
    );
    forward.flags = 0;
    forward.attempts = attempt.min(255) as u8;
    if syn {
        forward.state = flow_state::SYN_SENT;
        forward.syn_ns = health::now_ns();
    } else {
        forward.state = flow_state::UNKNOWN;
        forward.syn_ns = 0;
        // Picked up mid-stream by a FIN or RST: the close has begun.
        if flags & (TCP_FIN | TCP_RST) != 0 {
            close_seen(key, forward, flags, FLOW_F_FIN_CLIENT);
        }
    }
    if CONNTRACK.insert(&s.key, &s.forward, 0).is_err() {
        let _ = CONNTRACK.remove(&s.reverse_key);
        return Err(reason::CONNTRACK_FULL);
    }
    Ok(&raw mut s.forward)
}

/// Records the reply direction of the flow in `s.key` towards `backend`
/// and returns the source port its forward packets must carry. With SNAT
/// the reply entry is the port reservation: `BPF_NOEXIST` claims a
/// (backend, SNAT address, port) atomically across CPUs, starting at
/// `port_seed` within the SNAT range.
#[inline(always)]
fn install_reverse(
    s: &mut Scratch,
    service: &Service,
    backend_id: u32,
    backend: &Backend,
    port_seed: u32,
) -> Result<u16, u32> {
    let snat = service.flags & SERVICE_F_SNAT != 0;
    let key = &s.key;
    let reverse_key = &mut s.reverse_key;
    copy_addr(&mut reverse_key.src, &backend.addr);
    copy_addr(
        &mut reverse_key.dst,
        if snat { &service.snat_addr } else { &key.src },
    );
    reverse_key.sport = backend.port;
    reverse_key.dport = key.sport;
    reverse_key.proto = key.proto;
    reverse_key.family = key.family;
    reverse_key._pad = 0;
    let reverse = &mut s.reverse;
    fill(
        reverse, &key.dst, key.dport, &key.src, key.sport, backend_id, service.id,
    );
    reverse.flags = FLOW_F_REVERSE;
    reverse.state = flow_state::UNKNOWN;
    reverse.attempts = 0;
    reverse.syn_ns = 0;
    if !snat {
        if CONNTRACK
            .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(key.sport);
        }
        // Taken: by an earlier life of this same flow (overwrite it), or by
        // another flow whose replies would then be mistranslated (refuse).
        let same_flow = CONNTRACK.get_ptr_mut(&s.reverse_key).is_some_and(|other| {
            // SAFETY: a live conntrack value, read field by field.
            unsafe { (*other).new_src == key.dst && (*other).new_sport == key.dport }
        });
        if !same_flow {
            return Err(reason::REPLY_CONFLICT);
        }
        return if CONNTRACK.insert(&s.reverse_key, &s.reverse, 0).is_ok() {
            Ok(key.sport)
        } else {
            Err(reason::CONNTRACK_FULL)
        };
    }
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let mut attempt = 0;
    while attempt < SNAT_PORT_ATTEMPTS {
        let port = (SNAT_PORT_MIN + (port_seed.wrapping_add(attempt) % range) as u16).to_be();
        s.reverse_key.dport = port;
        if CONNTRACK
            .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(port);
        }
        if release_if_closed(s)
            && CONNTRACK
                .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
                .is_ok()
        {
            return Ok(port);
        }
        attempt += 1;
    }
    Err(reason::SNAT_PORTS_EXHAUSTED)
}

/// Where a new SNAT flow starts looking for a port: the ports are handed out
/// in turn (one shared counter), so each comes round as late as it can. A
/// hashed start would reuse a port as soon as chance had it, often while
/// the backend still holds the last connection on it in TIME_WAIT. Not
/// atomic (the BPF CPU version built for has no fetch-and-add): two CPUs may
/// start at the same port, and the `BPF_NOEXIST` claim sends one on.
#[inline(always)]
fn snat_seed() -> u32 {
    match SNAT_CURSOR.get_ptr_mut(0) {
        // SAFETY: a u32 inside a live map value.
        Some(cursor) => unsafe {
            let seed = *cursor;
            *cursor = seed.wrapping_add(1);
            seed
        },
        None => 0,
    }
}

/// A reply entry left by an orphaned flow is kept this long before its port
/// may be taken: a new flow inserts its reply entry before its forward one.
const ORPHAN_GRACE_SECONDS: u32 = 2;

/// The reply tuple in `s.reverse_key` is taken: frees it if the flow that
/// holds it is closed (its TIME_WAIT needs no reserved port: a SYN on it is a
/// new connection anyway), or gone. Returns whether it was freed.
#[inline(always)]
fn release_if_closed(s: &mut Scratch) -> bool {
    let Some(old) = CONNTRACK.get_ptr_mut(&s.reverse_key) else {
        return true; // freed meanwhile
    };
    // SAFETY: a live conntrack value.
    let old = unsafe { &*old };
    answer_key(&mut s.old_key, old, s.key.proto, s.key.family);
    let closed = match CONNTRACK.get_ptr_mut(&s.old_key) {
        // SAFETY: a live conntrack value.
        Some(forward) => unsafe { (*forward).state == flow_state::CLOSED },
        None => now_seconds().wrapping_sub(old.last_seen) >= ORPHAN_GRACE_SECONDS,
    };
    if !closed {
        return false;
    }
    let _ = CONNTRACK.remove(&s.old_key);
    let _ = CONNTRACK.remove(&s.reverse_key);
    true
}

/// Fills a flow value field by field: a struct literal with zeroed parts
/// becomes memset calls (byte loops) in BPF code.
#[inline(always)]
fn fill(
    f: &mut Flow,
    new_src: &[u32; 4],
    new_sport: u16,
    new_dst: &[u32; 4],
    new_dport: u16,
    backend_id: u32,
    service_id: u32,
) {
    copy_addr(&mut f.new_src, new_src);
    f.new_sport = new_sport;
    copy_addr(&mut f.new_dst, new_dst);
    f.new_dport = new_dport;
    f.backend_id = backend_id;
    f.service_id = service_id;
    f.fib.ifindex = 0;
    f.fib.stamp = 0;
    f._pad = 0;
    f.last_seen = now_seconds();
    f._pad2 = 0;
}

/// Writes the new addresses and ports and fixes the checksums incrementally:
/// in the packet (XDP), or, for the L4 checksum of an skb, by returning the
/// change for `skb_l4_checksum`.
#[inline(always)]
fn rewrite(
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

#[inline(always)]
fn account(service_id: u32, backend_id: u32, to_backend: bool, ctx: &Ctx) {
    if cfg!(feature = "no-stats") {
        return;
    }
    let bytes = ctx.len as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        add_traffic(s, to_backend, bytes);
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        add_traffic(b, to_backend, bytes);
    }
}

#[inline(always)]
fn add_traffic(stats: *mut agent_common::ServiceStats, to_backend: bool, bytes: u64) {
    // SAFETY: a per-CPU map slot from get_ptr_mut; only this CPU writes it.
    unsafe {
        if to_backend {
            (*stats).packets_to_backend += 1;
            (*stats).bytes_to_backend += bytes;
        } else {
            (*stats).packets_to_client += 1;
            (*stats).bytes_to_client += bytes;
        }
    }
}
