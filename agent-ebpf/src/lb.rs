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
    FAMILY_V4, FAMILY_V6, FLOW_F_REVERSE, Flow, FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP,
    SERVICE_F_SNAT, SNAT_PORT_ATTEMPTS, SNAT_PORT_MAX, SNAT_PORT_MIN, Service, ServiceKey, hash,
    prefilter, reason,
};
use aya_ebpf::bindings::{BPF_NOEXIST, bpf_fib_lookup};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    csum::Diff,
    fib::forward,
    headers::{
        IPV4_FRAG_MASK_BE, IPV6_FRAGMENT, Ipv4, Ipv6, Ports, TCP_ACK, TCP_CHECK_OFFSET,
        TCP_FLAGS_OFFSET, TCP_HDR_LEN, TCP_SYN, UDP_CHECK_OFFSET, UDP_HDR_LEN, is_ipv6_extension,
    },
    maps::{
        BACKEND_FIB, BACKEND_STATS, BACKENDS, CONNTRACK, MAGLEV, PREFILTER, REASONS, SCRATCH,
        SERVICE_STATS, SERVICES,
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
    let pkt = Packet {
        family: FAMILY_V4,
        proto,
        l3: ETH_LEN,
        l4,
        ip_end: ETH_LEN + u16::from_be(tot_len) as usize,
    };
    transport(ctx, &pkt, &src, &dst)
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
        l3: ETH_LEN,
        l4,
        ip_end: l4 + u16::from_be(payload_len) as usize,
    };
    transport(ctx, &pkt, &src, &dst)
}

/// Reads the ports and decides whether the packet is for a service, a reply
/// to reverse-NAT, or not ours.
#[inline(always)]
fn transport(ctx: &Ctx, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) -> Action {
    let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4) else {
        return unhandled(src, dst, reason::TRUNCATED);
    };
    // SAFETY: checked by ptr_at.
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };

    let to_service = prefilter_hit(prefilter::SERVICE, dst, dport, pkt.proto);
    if !to_service && !prefilter_hit(prefilter::BACKEND, src, sport, pkt.proto) {
        return Action::Pass;
    }
    let Some(s) = scratch() else {
        return Action::Pass;
    };
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
    match new_flow(s, &service) {
        Ok(flow) => {
            // A connection starts with a SYN (or any UDP datagram); a
            // mid-stream packet without an entry (evicted, or from before a
            // restart) is re-pinned by the same Maglev choice but is not a
            // new connection.
            let opening =
                pkt.proto == PROTO_UDP || tcp_flags(ctx, pkt) & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if opening {
                // SAFETY: a live map value.
                count_connection(service.id, unsafe { (*flow).backend_id });
            }
            translate(ctx, pkt, &s.key, &mut s.fib, flow)
        }
        Err(code) => {
            log_refused_flow(ctx, service.id, code);
            exception(code)
        }
    }
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
fn tcp_flags(ctx: &Ctx, pkt: &Packet) -> u8 {
    match ptr_at::<u8>(ctx, pkt.l4 + TCP_FLAGS_OFFSET) {
        // SAFETY: checked by ptr_at.
        Some(flags) => unsafe { *flags },
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
    rewrite(
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
    // FIB result per backend serves all its flows, new ones included. Towards
    // a client it is the flow's own.
    let cache = match BACKEND_FIB.get_ptr_mut(f.backend_id) {
        // SAFETY: an array slot; concurrent writers store the same result.
        Some(cache) if to_backend => unsafe { &mut *cache },
        _ => &mut f.fib,
    };
    forward(ctx, pkt, params, &f.new_src, &f.new_dst, cache)
}

/// Picks the backend by Maglev, records both directions of the flow, and
/// returns the forward entry (its copy in the scratch area).
#[inline(always)]
fn new_flow(s: &mut Scratch, service: &Service) -> Result<*mut Flow, u32> {
    let key = &s.key;
    let h = hash::flow_hash(&key.src, &key.dst, key.sport, key.dport, key.proto);
    if service.table_size == 0 {
        return Err(reason::NO_BACKEND);
    }
    let slot = service.table_offset + h % service.table_size;
    let backend_id = match MAGLEV.get(slot) {
        Some(id) if *id != NO_BACKEND => *id,
        _ => return Err(reason::NO_BACKEND),
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Err(reason::NO_BACKEND);
    };
    let snat = service.flags & SERVICE_F_SNAT != 0;

    // The reverse entry first: with SNAT it is the port reservation.
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
    let (reverse, key) = (&mut s.reverse, &s.key);
    fill(
        reverse, &key.dst, key.dport, &key.src, key.sport, backend_id, service.id,
    );
    reverse.flags = FLOW_F_REVERSE;
    let mut new_sport = key.sport;
    if snat {
        // BPF_NOEXIST makes claiming a (backend, SNAT address, port) atomic
        // across CPUs.
        let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
        let mut attempt = 0;
        let mut claimed = false;
        while attempt < SNAT_PORT_ATTEMPTS {
            let port = (SNAT_PORT_MIN + (h.wrapping_add(attempt) % range) as u16).to_be();
            s.reverse_key.dport = port;
            if CONNTRACK
                .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                new_sport = port;
                claimed = true;
                break;
            }
            attempt += 1;
        }
        if !claimed {
            return Err(reason::SNAT_PORTS_EXHAUSTED);
        }
    } else if CONNTRACK.insert(&s.reverse_key, &s.reverse, 0).is_err() {
        return Err(reason::CONNTRACK_FULL);
    }

    let (forward, key) = (&mut s.forward, &s.key);
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
    if CONNTRACK.insert(&s.key, &s.forward, 0).is_err() {
        let _ = CONNTRACK.remove(&s.reverse_key);
        return Err(reason::CONNTRACK_FULL);
    }
    Ok(&raw mut s.forward)
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
}

/// Writes the new addresses and ports and fixes the checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &Ctx,
    pkt: &Packet,
    old: &FlowKey,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) {
    let addrs = Diff::default().addr(&old.src, src).addr(&old.dst, dst);
    let l4 = addrs.word16(old.sport, sport).word16(old.dport, dport);

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
