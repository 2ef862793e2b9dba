//! The load-balancing pipeline, shared by the XDP and TC entry points:
//! parse → service → conntrack (or a new flow: select a backend) → TCP
//! state and failures → NAT → forward. Each stage is a module; this one
//! only calls them in order.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use agent_common::{
    FLOW_F_ACTIVE_COUNTED, FLOW_F_AFFINITY, FLOW_F_DSR, FLOW_F_DSR_TUNNEL, FLOW_F_FIN_CLIENT,
    FLOW_F_REVERSE, Flow, FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP, SERVICE_F_AFFINITY,
    SERVICE_F_DSR_L2, SERVICE_F_DSR_TUNNEL, SERVICE_F_LEAST_CONN, SERVICE_F_SNAT,
    SERVICE_F_SNAT_REMOTE, SERVICE_F_SOURCE_RANGES, Service, event_kind, flow_state, prefilter,
    reason, snat_for,
};
use aya_ebpf::bindings::bpf_fib_lookup;

use crate::{
    affinity, budget,
    conntrack::{self, Table, copy_flow, fill, install_reverse, snat_seed},
    encap, events, failure,
    forward::{self, ttl_allows_forwarding},
    headers::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    icmp,
    integrity::{self, check_syn},
    least_conn,
    maps::{BACKEND_FIB, BACKENDS, CONNTRACK, HALF_OPEN},
    nat::{rewrite, skb_l4_checksum},
    packet::{Action, Ctx, EncapRequest, NO_REFUSAL, Packet, Scratch, fragment},
    parse::{self, Next, tcp_flags, tcp_seq_ack, validate},
    resyn, select, service,
    stats::{account, exception, with_stats},
    tcp_state::{backend_tcp, client_tcp, close_seen, established_tcp, start_attempt, syn_facts},
};

/// Runs the pipeline on one packet.
#[inline(always)]
pub fn process(ctx: &Ctx) -> Action {
    parse::parse(ctx, &Stages)
}

/// The stages after parsing, in the order `parse` hands packets on.
struct Stages;

impl Next for Stages {
    #[inline(always)]
    fn transport(
        &self,
        ctx: &Ctx,
        s: &mut Scratch,
        pkt: &Packet,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> Action {
        transport(ctx, s, pkt, src, dst)
    }

    #[inline(always)]
    fn icmp(&self, ctx: &Ctx, l4: usize, family: u8) -> Action {
        icmp::error(ctx, l4, family)
    }

    #[inline(always)]
    fn unhandled(&self, src: &[u32; 4], dst: &[u32; 4], code: u32) -> Action {
        service::unhandled(src, dst, code)
    }
}

/// Reads the ports and decides whether the packet is for a service, a reply
/// to reverse-NAT, or not ours.
#[inline(always)]
fn transport(ctx: &Ctx, s: &mut Scratch, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4]) -> Action {
    let (sport, dport) = match parse::ports(ctx, s, pkt, src, dst) {
        Ok(ports) => ports,
        Err(code) => return service::unhandled(src, dst, code),
    };

    let to_service = service::prefilter_hit(prefilter::SERVICE, dst, dport, pkt.proto);
    if !to_service && !service::prefilter_hit(prefilter::BACKEND, src, sport, pkt.proto) {
        return Action::Pass;
    }
    if pkt.fragment == fragment::FIRST {
        parse::remember_ports(s, pkt, src, dst, sport, dport);
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
    let flags = if pkt.proto == PROTO_TCP && pkt.fragment != fragment::LATER {
        tcp_flags(ctx, pkt)
    } else {
        0
    };
    let syn = pkt.proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A client's SYN is checked here, before the ways part (one copy of the
    // check for the verifier to walk), and the result acted on only once
    // the packet is known to be Sluice's.
    if syn {
        admit_syn(ctx, pkt, src, dst, s);
    }
    // An established flow needs only its conntrack entry, in either
    // direction. A client's SYN on a closed one starts a new connection.
    if let Some(flow) = CONNTRACK.get_ptr_mut(&s.key) {
        if let Err(code) = validate(ctx, pkt) {
            return exception(code);
        }
        // SAFETY: a live conntrack value, not aliased by the scratch area.
        let f = unsafe { &mut *flow };
        conntrack::touch(f);
        let mut restarts = false;
        if pkt.proto == PROTO_TCP && pkt.fragment != fragment::LATER {
            if syn && let Some(code) = syn_refusal(s) {
                return exception(code);
            }
            restarts = established_tcp(s, f, flags);
        }
        if !restarts {
            return translate(ctx, pkt, &s.key, &mut s.fib, &mut s.encap, flow);
        }
        least_conn::closed(f);
        conntrack::forget(s, f);
    }
    // A connect being made: its entries are half-open until the client
    // acknowledges the SYN-ACK. Translated from a scratch copy, which the
    // new flows below share (one more translation for the verifier to walk
    // would not fit); a half-open flow's packets are few.
    let half_open_entry = HALF_OPEN.get_ptr_mut(&s.key);
    let flow = if let Some(entry) = half_open_entry {
        match half_open(ctx, s, pkt, flags, entry) {
            Ok(flow) => flow,
            Err(code) => return exception(code),
        }
    } else {
        if !to_service {
            return Action::Pass;
        }
        let Some(service) = service::lookup(&mut s.service_key, dst, dport, pkt.proto, pkt.family)
        else {
            return Action::Pass;
        };
        if let Err(code) = validate(ctx, pkt) {
            return exception(code);
        }
        // `allowed_sources`: a source in none of the service's ranges
        // creates nothing (no budget taken, no pick, no entry). Flows
        // admitted before a range was removed keep their entries above.
        if service.flags & SERVICE_F_SOURCE_RANGES != 0
            && !service::source_allowed(&mut s.source_key, service.id, src, pkt.family)
        {
            return exception(reason::SOURCE_DENIED);
        }
        // A connection starts with a SYN (or any UDP datagram); a mid-stream
        // packet without an entry (evicted, or from before a restart) is
        // re-pinned by the same Maglev choice but is not a new connection.
        // Nothing that can't reach a backend creates state.
        if syn && let Some(code) = syn_refusal(s) {
            return exception(code);
        }
        if !ttl_allows_forwarding(ctx, pkt) {
            return exception(reason::TTL_EXCEEDED);
        }
        match new_flow(s, &service, syn, flags) {
            Ok(flow) => {
                if syn || pkt.proto == PROTO_UDP {
                    // SAFETY: the scratch copy of the new entry.
                    let backend_id = unsafe { (*flow).backend_id };
                    failure::count_connection(service.id, backend_id);
                    if syn && failure::retries(service.id) {
                        resyn::remember(ctx, pkt, s);
                    }
                    if pkt.proto == PROTO_UDP {
                        let now = failure::now_ns();
                        events::emit(event_kind::OPEN, 0, &s.key, service.id, backend_id, 0, now);
                    }
                }
                flow
            }
            Err(code) => {
                log_refused_flow(ctx, service.id, code);
                return exception(code);
            }
        }
    };
    translate(ctx, pkt, &s.key, &mut s.fib, &mut s.encap, flow)
}

/// The TCP state of a half-open flow (`f`), from whichever side the
/// packet comes: the connect, its success or failure.
#[inline(always)]
fn connect_state(
    ctx: &Ctx,
    s: &mut Scratch,
    pkt: &Packet,
    f: &mut Flow,
    flags: u8,
) -> Result<(), u32> {
    if f.flags & FLOW_F_REVERSE == 0 {
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && let Some(code) = syn_refusal(s)
        {
            return Err(code);
        }
        client_tcp(s, f, flags, Table::HalfOpen)
    } else {
        let ack = if flags & (TCP_SYN | TCP_RST) != 0 {
            tcp_seq_ack(ctx, pkt).1
        } else {
            0
        };
        if flags & TCP_RST != 0 {
            // Where a refusal's headers are, should it become a SYN (see
            // `resyn`).
            s.resyn_l3 = pkt.l3 as u32;
            s.resyn_l4 = pkt.l4 as u32;
        }
        backend_tcp(s, f, flags, ack, ctx.ifindex, Table::HalfOpen)
    }
}

/// A packet of a half-open flow (`entry`, in `HALF_OPEN`): its TCP state,
/// then a copy of the entry in the scratch area to translate by. The
/// client's first packet after the backend's SYN-ACK completes the
/// handshake: the flow moves to `CONNTRACK`.
#[inline(always)]
fn half_open(
    ctx: &Ctx,
    s: &mut Scratch,
    pkt: &Packet,
    flags: u8,
    entry: *mut Flow,
) -> Result<*mut Flow, u32> {
    validate(ctx, pkt)?;
    // SAFETY: a live map value, not aliased by the scratch area.
    let f = unsafe { &mut *entry };
    conntrack::touch(f);
    if pkt.fragment != fragment::LATER {
        connect_state(ctx, s, pkt, f, flags)?;
    }
    copy_flow(&mut s.forward, f);
    if f.flags & FLOW_F_REVERSE == 0
        && f.state == flow_state::ESTABLISHED
        && flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
    {
        conntrack::promote(s);
    }
    Ok(&raw mut s.forward)
}

/// Checks a client's SYN before it is forwarded or counted: its TTL must
/// allow forwarding, and its checksums must be right (see `integrity`).
/// What it found is left in the scratch area (`Scratch::syn_refusal`) for
/// `syn_refusal` and `tcp_state::syn_facts`.
#[inline(always)]
fn admit_syn(ctx: &Ctx, pkt: &Packet, src: &[u32; 4], dst: &[u32; 4], s: &mut Scratch) {
    let (refusal, verified) = if !ttl_allows_forwarding(ctx, pkt) {
        (reason::TTL_EXCEEDED, false)
    } else {
        match check_syn(ctx, pkt, src, dst, &mut s.words) {
            Ok(found) => (NO_REFUSAL, found == integrity::Syn::Intact),
            Err(code) => (code, false),
        }
    };
    let seq = tcp_seq_ack(ctx, pkt).0;
    // SAFETY: writes to this CPU's scratch area; volatile, so that they are
    // read back from memory (see `Scratch::syn_refusal`).
    unsafe {
        core::ptr::write_volatile(&mut s.syn_refusal, refusal);
        core::ptr::write_volatile(&mut s.syn_verified, u32::from(verified));
        core::ptr::write_volatile(&mut s.syn_seq, seq);
    }
}

/// Why the client's SYN being handled must not go on, if it must not (see
/// `admit_syn`).
#[inline(always)]
fn syn_refusal(s: &Scratch) -> Option<u32> {
    // SAFETY: a read of this CPU's scratch area.
    let code = unsafe { core::ptr::read_volatile(&s.syn_refusal) };
    (code != NO_REFUSAL).then_some(code)
}

/// Picks the backend (a client's live affinity entry, else Maglev,
/// skipping ejected backends), records both
/// directions of the flow (a SYN's in `HALF_OPEN`, others' in `CONNTRACK`),
/// and returns the forward entry (its copy in the scratch area). A RST
/// creates nothing: with DNAT it goes to the Maglev choice untracked.
#[inline(always)]
fn new_flow(s: &mut Scratch, service: &Service, syn: bool, flags: u8) -> Result<*mut Flow, u32> {
    // Direct server return: the LB sees only the client's side, so the flow
    // has no reverse entry, no connect to watch (no HALF_OPEN, no SYN-ACK,
    // no timeout) and its packets stay as sent (see `FLOW_F_DSR`).
    let dsr = service.flags & (SERVICE_F_DSR_L2 | SERVICE_F_DSR_TUNNEL) != 0;
    let untracked = !syn && flags & TCP_RST != 0;
    if untracked && service.flags & (SERVICE_F_SNAT | SERVICE_F_SNAT_REMOTE) != 0 {
        // Which SNAT port the flow had (if it had one) is gone with its
        // entry.
        return Err(reason::UNTRACKED_RST);
    }
    if !untracked && !budget::take(service.id) {
        with_stats(true, service.id, |st| st.over_budget += 1);
        return Err(reason::NEW_FLOW_BUDGET);
    }
    let table = if syn && !dsr {
        Table::HalfOpen
    } else {
        Table::Established
    };
    if !choose(s, service, untracked) {
        return Err(reason::NO_BACKEND);
    }
    // SAFETY: reads of this CPU's scratch area (see `choose`).
    let (backend_id, attempt, affinity_flag) = unsafe {
        (
            core::ptr::read_volatile(&s.chosen[0]),
            core::ptr::read_volatile(&s.chosen[1]),
            core::ptr::read_volatile(&s.chosen[2]),
        )
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Err(reason::NO_BACKEND);
    };
    // The service's SNAT, or a NodePort entry's towards another node.
    let snat = snat_for(service, backend);
    let seed = if snat { snat_seed() } else { 0 };
    let new_sport = if untracked || dsr {
        s.key.sport
    } else {
        install_reverse(s, service, backend_id, backend, seed, table, snat)?
    };

    let facts = syn_facts(s);
    let (forward, key) = (&mut s.forward, &s.key);
    // The tunnel's outer source is the service's `snat_addr` too.
    let tunnel = service.flags & SERVICE_F_DSR_TUNNEL != 0;
    let new_src = if snat || tunnel {
        &service.snat_addr
    } else {
        &key.src
    };
    let new_dport = if dsr { key.dport } else { backend.port };
    fill(
        forward,
        new_src,
        new_sport,
        &backend.addr,
        new_dport,
        backend_id,
        service.id,
    );
    // A connect of an affinity service: its SYN-ACK confirms (or, after
    // a retry, moves) the client's affinity (see `tcp_state::backend_tcp`).
    let chosen_flags = if syn {
        affinity_flag
    } else {
        affinity_flag & FLOW_F_ACTIVE_COUNTED
    };
    forward.flags = chosen_flags
        | if tunnel {
            FLOW_F_DSR | FLOW_F_DSR_TUNNEL
        } else if dsr {
            FLOW_F_DSR
        } else {
            0
        };
    forward.attempts = attempt.min(255) as u8;
    // A DSR connect too starts in SYN_SENT (in `CONNTRACK`, as the LB sees
    // no SYN-ACK to move it from `HALF_OPEN`): its retransmitted SYNs stay
    // on the backend, it expires after the SYN timeout if the client never
    // goes on, and the client's first ACK establishes it
    // (`tcp_state::established_tcp`).
    if syn {
        forward.state = flow_state::SYN_SENT;
        forward.syn_ns = failure::now_ns();
        start_attempt(forward, facts);
    } else {
        forward.state = flow_state::UNKNOWN;
        forward.syn_ns = 0;
        // Picked up mid-stream by a FIN or RST: the close has begun.
        if flags & (TCP_FIN | TCP_RST) != 0 {
            close_seen(key, forward, flags, FLOW_F_FIN_CLIENT);
        }
    }
    if untracked {
        return Ok(&raw mut s.forward);
    }
    let map = table.map();
    if map.insert(&s.key, &s.forward, 0).is_err() {
        if !dsr {
            let _ = map.remove(&s.reverse_key);
        }
        return Err(reason::CONNTRACK_FULL);
    }
    least_conn::opened(&s.forward);
    Ok(&raw mut s.forward)
}

/// The backend of a new flow of `service` (whose forward key is `s.key`):
/// the client's live affinity entry's, else the Maglev choice, or for a
/// least-connections service the less loaded of it and a random slot's
/// backend (recorded as the client's affinity for an affinity service,
/// unless the packet is an untracked RST). Left in `s.chosen` (backend id,
/// attempt, the flow's `FLOW_F_AFFINITY` and `FLOW_F_ACTIVE_COUNTED`
/// bits), not returned: read back from memory, the
/// outcomes are one state for the verifier to walk the rest of the new
/// flow with, not one per way of choosing. False: no backend.
#[inline(always)]
fn choose(s: &mut Scratch, service: &Service, untracked: bool) -> bool {
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    let least_conn = service.flags & SERVICE_F_LEAST_CONN != 0;
    let kept = if affinity {
        affinity::backend(&mut s.affinity_key, service, &s.key, !untracked)
    } else {
        None
    };
    let (backend_id, attempt) = match kept {
        Some(id) => (id, 0),
        None => {
            let h = select::first_hash(service, &s.key);
            let Some(mut choice) = select::pick(service, h, NO_BACKEND, 0) else {
                return false;
            };
            if least_conn {
                choice.0 = least_conn::choose(service, choice.0);
            }
            if affinity && !untracked {
                affinity::record(&mut s.affinity_key, service.id, &s.key, choice.0);
            }
            choice
        }
    };
    let flag = if affinity { FLOW_F_AFFINITY } else { 0 }
        | if least_conn && !untracked {
            FLOW_F_ACTIVE_COUNTED
        } else {
            0
        };
    // SAFETY: writes to this CPU's scratch area; volatile, so that they are
    // read back from memory.
    unsafe {
        core::ptr::write_volatile(&mut s.chosen[0], backend_id);
        core::ptr::write_volatile(&mut s.chosen[1], attempt);
        core::ptr::write_volatile(&mut s.chosen[2], flag);
    }
    true
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
    encap_request: &mut EncapRequest,
    flow: *mut Flow,
) -> Action {
    // SAFETY: `flow` is valid and aliases neither `key` nor `params`.
    let f = unsafe { &mut *flow };
    // Before any rewrite: the kernel's ICMP time-exceeded must quote the
    // packet the client sent.
    if !ttl_allows_forwarding(ctx, pkt) {
        return exception(reason::TTL_EXCEEDED);
    }
    // A DSR flow's packet keeps its addresses: `new_dst` is the backend's
    // address and `new_src` the tunnel's or the client's, for the next hop
    // (and the outer header) only.
    let dsr = f.flags & FLOW_F_DSR != 0;
    let (to_src, to_dst) = if dsr {
        (&key.src, &key.dst)
    } else {
        (&f.new_src, &f.new_dst)
    };
    let l4_change = rewrite(ctx, pkt, key, to_src, f.new_sport, to_dst, f.new_dport);
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
    let action = forward::to_next_hop(ctx, pkt, params, &f.new_src, &f.new_dst, cache, dsr);
    encap::request(encap_request, ctx, pkt, f, &action);
    if ctx.skb && pkt.fragment != fragment::LATER {
        // Last: the helper may move the packet, which ends direct access.
        skb_l4_checksum(ctx, pkt, l4_change);
    }
    action
}

/// A connection Sluice could not open is worth a log line (via aya-log into
/// the agent's log), a few a second at most (see `budget`): the
/// per-reason counters count every packet.
#[inline(always)]
fn log_refused_flow(ctx: &Ctx, service_id: u32, code: u32) {
    if !matches!(
        code,
        reason::NO_BACKEND | reason::CONNTRACK_FULL | reason::SNAT_PORTS_EXHAUSTED
    ) || !budget::may_log()
    {
        return;
    }
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
