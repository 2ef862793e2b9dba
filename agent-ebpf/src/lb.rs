//! The load-balancing pipeline, shared by the XDP and TC entry points:
//! parse → find the service (or the reverse-NAT entry) → pick or recall the
//! backend → rewrite → forward by FIB lookup.

use core::{ffi::c_void, mem};

use agent_common::{
    Backend, FAMILY_V4, FAMILY_V6, FLOW_F_REVERSE, FLOW_F_SNAT, Flow, FlowKey, NO_BACKEND,
    PROTO_TCP, PROTO_UDP, SERVICE_F_SNAT, SNAT_PORT_ATTEMPTS, SNAT_PORT_MAX, SNAT_PORT_MIN,
    Service, ServiceKey, hash, prefilter, reason,
};
use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
    bpf_fib_lookup,
};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    csum::Diff,
    headers::{
        IPV4_FRAG_MASK_BE, IPV6_FRAGMENT, Ipv4, Ipv6, Ports, TCP_ACK, TCP_CHECK_OFFSET,
        TCP_FLAGS_OFFSET, TCP_HDR_LEN, TCP_SYN, UDP_CHECK_OFFSET, UDP_HDR_LEN,
        is_ipv6_extension,
    },
    maps::{
        BACKEND_STATS, BACKENDS, CONNTRACK, MAGLEV, PREFILTER, REASONS, SERVICE_STATS, SERVICES,
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
    pub ifindex: u32,
    /// The program's context (`xdp_md` or `__sk_buff`) for helpers.
    pub raw: *mut c_void,
}

/// What parsing found out about an IP packet carrying TCP or UDP.
struct Packet {
    family: u8,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP/UDP header.
    l4: usize,
    /// End of the IP datagram according to its own length field.
    ip_end: usize,
}

const ETH_LEN: usize = mem::size_of::<EthHdr>();

#[inline(always)]
fn ptr_at<T>(ctx: &Ctx, offset: usize) -> Option<*mut T> {
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
fn exception(code: u32) -> Action {
    count(code);
    if agent_common::reason::ALL[code as usize].dropped {
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

/// A packet Sluice can't handle: ours (to a VIP or from a backend) is dropped
/// by reason, anything else passes untouched.
#[inline(always)]
fn unhandled(src: &[u32; 4], dst: &[u32; 4], code: u32) -> Action {
    if prefilter_hit(prefilter::SERVICE_ADDR, dst, 0, 0)
        || prefilter_hit(prefilter::BACKEND_ADDR, src, 0, 0)
    {
        exception(code)
    } else {
        Action::Pass
    }
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
        return Action::Pass;
    }
    let src = [src, 0, 0, 0];
    let dst = [dst, 0, 0, 0];
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return unhandled(&src, &dst, reason::BAD_LENGTH);
    }
    if frag_off & IPV4_FRAG_MASK_BE != 0 {
        return unhandled(&src, &dst, reason::FRAGMENT);
    }
    // IPv4 options are skipped, not parsed: forwarding doesn't need them.
    let l4 = ETH_LEN + ihl * 4;
    let ip_end = ETH_LEN + u16::from_be(tot_len) as usize;
    let pkt = Packet {
        family: FAMILY_V4,
        proto,
        src,
        dst,
        sport: 0,
        dport: 0,
        l3: ETH_LEN,
        l4,
        ip_end,
    };
    transport(ctx, pkt)
}

#[inline(always)]
fn ipv6(ctx: &Ctx) -> Action {
    let Some(ip) = ptr_at::<Ipv6>(ctx, ETH_LEN) else {
        return exception(reason::SHORT_FRAME);
    };
    // SAFETY: the IPv6 header is inside the packet (checked above).
    let (next_hdr, src, dst, payload_len) =
        unsafe { ((*ip).next_hdr, (*ip).src, (*ip).dst, (*ip).payload_len) };
    if next_hdr != PROTO_TCP && next_hdr != PROTO_UDP {
        if next_hdr == IPV6_FRAGMENT {
            return unhandled(&src, &dst, reason::FRAGMENT);
        }
        if is_ipv6_extension(next_hdr) {
            return unhandled(&src, &dst, reason::IPV6_EXTENSION);
        }
        return Action::Pass;
    }
    let l4 = ETH_LEN + mem::size_of::<Ipv6>();
    let pkt = Packet {
        family: FAMILY_V6,
        proto: next_hdr,
        src,
        dst,
        sport: 0,
        dport: 0,
        l3: ETH_LEN,
        l4,
        ip_end: l4 + u16::from_be(payload_len) as usize,
    };
    transport(ctx, pkt)
}

/// Reads the ports and decides whether the packet is for a service, a reply
/// to reverse-NAT, or not ours.
#[inline(always)]
fn transport(ctx: &Ctx, mut pkt: Packet) -> Action {
    let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4) else {
        return unhandled(&pkt.src, &pkt.dst, reason::TRUNCATED);
    };
    // SAFETY: checked by ptr_at.
    unsafe {
        pkt.sport = (*ports).src;
        pkt.dport = (*ports).dst;
    }

    if prefilter_hit(prefilter::SERVICE, &pkt.dst, pkt.dport, pkt.proto) {
        let key = ServiceKey {
            addr: pkt.dst,
            port: pkt.dport,
            proto: pkt.proto,
            family: pkt.family,
        };
        // SAFETY: the value is copied out at once; the agent replaces (never
        // edits in place) service entries.
        if let Some(service) = unsafe { SERVICES.get(&key) } {
            let service = *service;
            if let Err(code) = validate(ctx, &pkt) {
                return exception(code);
            }
            return to_backend(ctx, &pkt, &service);
        }
    }
    if prefilter_hit(prefilter::BACKEND, &pkt.src, pkt.sport, pkt.proto) {
        let key = flow_key(&pkt);
        // SAFETY: copied out at once; LRU entries may be evicted under us.
        if let Some(flow) = unsafe { CONNTRACK.get(&key) } {
            let flow = *flow;
            if flow.flags & FLOW_F_REVERSE != 0 {
                if let Err(code) = validate(ctx, &pkt) {
                    return exception(code);
                }
                return to_client(ctx, &pkt, &flow);
            }
        }
    }
    Action::Pass
}

/// Lengths checked only for packets we are about to rewrite.
#[inline(always)]
fn validate(ctx: &Ctx, pkt: &Packet) -> Result<(), u32> {
    let l4_len = if pkt.proto == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if ctx.data + pkt.l4 + l4_len > ctx.data_end {
        return Err(reason::TRUNCATED);
    }
    if pkt.ip_end < pkt.l4 + l4_len || ctx.data + pkt.ip_end > ctx.data_end {
        return Err(reason::BAD_LENGTH);
    }
    Ok(())
}

#[inline(always)]
fn flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    }
}

#[inline(always)]
fn tcp_flags(ctx: &Ctx, pkt: &Packet) -> u8 {
    match ptr_at::<u8>(ctx, pkt.l4 + TCP_FLAGS_OFFSET) {
        // SAFETY: checked by ptr_at.
        Some(flags) => unsafe { *flags },
        None => 0,
    }
}

/// Client → VIP: recall or choose the backend, then DNAT (and SNAT).
#[inline(always)]
fn to_backend(ctx: &Ctx, pkt: &Packet, service: &Service) -> Action {
    let key = flow_key(pkt);
    // SAFETY: copied out at once.
    let known = unsafe { CONNTRACK.get(&key) }.copied();
    let flow = match known {
        Some(flow) if flow.flags & FLOW_F_REVERSE == 0 => flow,
        _ => match new_flow(&key, service) {
            Ok(flow) => {
                // A connection starts with a SYN (or any UDP datagram); a
                // mid-stream packet without an entry is re-pinned by the same
                // Maglev choice, not counted as a new connection.
                let opening = pkt.proto == PROTO_UDP
                    || tcp_flags(ctx, pkt) & (TCP_SYN | TCP_ACK) == TCP_SYN;
                if opening {
                    count_connection(flow.service_id, flow.backend_id);
                }
                flow
            }
            Err(code) => return exception(code),
        },
    };

    let (new_src, new_sport) = if flow.flags & FLOW_F_SNAT != 0 {
        (flow.snat_addr, flow.snat_port)
    } else {
        (pkt.src, pkt.sport)
    };
    rewrite(ctx, pkt, new_src, new_sport, flow.nat_addr, flow.nat_port);
    account(flow.service_id, flow.backend_id, true, ctx);
    forward(ctx, pkt, &new_src, &flow.nat_addr)
}

/// Backend → client: restore the VIP as source (and the client as destination).
#[inline(always)]
fn to_client(ctx: &Ctx, pkt: &Packet, flow: &Flow) -> Action {
    let (new_dst, new_dport) = if flow.flags & FLOW_F_SNAT != 0 {
        (flow.snat_addr, flow.snat_port)
    } else {
        (pkt.dst, pkt.dport)
    };
    rewrite(ctx, pkt, flow.nat_addr, flow.nat_port, new_dst, new_dport);
    account(flow.service_id, flow.backend_id, false, ctx);
    forward(ctx, pkt, &flow.nat_addr, &new_dst)
}

/// Picks the backend by Maglev and records both directions of the flow.
#[inline(always)]
fn new_flow(key: &FlowKey, service: &Service) -> Result<Flow, u32> {
    let h = hash::flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
    if service.table_size == 0 {
        return Err(reason::NO_BACKEND);
    }
    let slot = service.table_offset + h % service.table_size;
    let backend_id = match MAGLEV.get(slot) {
        Some(id) if *id != NO_BACKEND => *id,
        _ => return Err(reason::NO_BACKEND),
    };
    let backend: Backend = match BACKENDS.get(backend_id) {
        Some(b) => *b,
        None => return Err(reason::NO_BACKEND),
    };
    let snat = service.flags & SERVICE_F_SNAT != 0;

    let mut flow = Flow {
        nat_addr: backend.addr,
        snat_addr: [0; 4],
        nat_port: backend.port,
        snat_port: 0,
        backend_id,
        service_id: service.id,
        flags: 0,
    };
    let mut reverse_key = FlowKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    };
    let mut reverse = Flow {
        nat_addr: key.dst,
        snat_addr: [0; 4],
        nat_port: key.dport,
        snat_port: 0,
        backend_id,
        service_id: service.id,
        flags: FLOW_F_REVERSE,
    };

    if snat {
        flow.flags |= FLOW_F_SNAT;
        flow.snat_addr = service.snat_addr;
        reverse.flags |= FLOW_F_SNAT;
        reverse.snat_addr = key.src;
        reverse.snat_port = key.sport;
        reverse_key.dst = service.snat_addr;
        // The reverse entry doubles as the port reservation: BPF_NOEXIST makes
        // claiming a (backend, SNAT address, port) atomic across CPUs.
        let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
        let mut port_found = false;
        let mut attempt = 0;
        while attempt < SNAT_PORT_ATTEMPTS {
            let port = SNAT_PORT_MIN + (h.wrapping_add(attempt) % range) as u16;
            reverse_key.dport = port.to_be();
            if CONNTRACK
                .insert(&reverse_key, &reverse, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                flow.snat_port = port.to_be();
                port_found = true;
                break;
            }
            attempt += 1;
        }
        if !port_found {
            return Err(reason::SNAT_PORTS_EXHAUSTED);
        }
    } else if CONNTRACK.insert(&reverse_key, &reverse, 0).is_err() {
        return Err(reason::CONNTRACK_FULL);
    }
    if CONNTRACK.insert(key, &flow, 0).is_err() {
        let _ = CONNTRACK.remove(&reverse_key);
        return Err(reason::CONNTRACK_FULL);
    }
    Ok(flow)
}

/// Writes the new addresses and ports and fixes the checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &Ctx,
    pkt: &Packet,
    src: [u32; 4],
    sport: u16,
    dst: [u32; 4],
    dport: u16,
) {
    let addrs = Diff::default().addr(&pkt.src, &src).addr(&pkt.dst, &dst);
    let l4 = addrs.word16(pkt.sport, sport).word16(pkt.dport, dport);

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
            (*ip).src = src;
            (*ip).dst = dst;
        }
    }
    if let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4) {
        // SAFETY: as above.
        unsafe {
            (*ports).src = sport;
            (*ports).dst = dport;
        }
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
}

/// Sends the rewritten packet towards its new destination by FIB lookup.
#[inline(always)]
fn forward(ctx: &Ctx, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) -> Action {
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is its empty state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
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
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.raw,
            &mut params,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel resolves the neighbour and forwards this packet itself.
        BPF_FIB_LKUP_RET_NO_NEIGH => return exception(reason::FIB_NO_NEIGHBOUR),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return exception(reason::FIB_FRAG_NEEDED),
        _ => return exception(reason::FIB_NO_ROUTE),
    }
    if !decrement_ttl(ctx, pkt) {
        return exception(reason::TTL_EXCEEDED);
    }
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: inside the packet (ptr_at).
        unsafe {
            (*eth).dst_addr = params.dmac;
            (*eth).src_addr = params.smac;
        }
    }
    if params.ifindex == ctx.ifindex {
        Action::Tx
    } else {
        Action::Redirect(params.ifindex)
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

#[inline(always)]
fn count_connection(service_id: u32, backend_id: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { (*s).connections += 1 };
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*b).connections += 1 };
    }
}

#[inline(always)]
fn account(service_id: u32, backend_id: u32, to_backend: bool, ctx: &Ctx) {
    let bytes = (ctx.data_end - ctx.data) as u64;
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
