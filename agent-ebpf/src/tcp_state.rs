//! Stage 5: the TCP state of a tracked flow, from both sides: SYN
//! retransmissions (timeouts), refusals held back for a retry on another
//! backend, SYN-ACKs (success), and closes.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use agent_common::{
    FLOW_F_AFFINITY, FLOW_F_DSR, FLOW_F_FAILURE_COUNTED, FLOW_F_FIN_BACKEND, FLOW_F_FIN_CLIENT,
    FLOW_F_VERIFIED, Flow, FlowKey, SERVICE_F_RETRY, SNAT_PORT_MIN, flow_state, reason, snat_for,
};

use crate::{
    affinity,
    conntrack::{Table, answer_key, forward_of, install_reverse},
    failure::{self, Failure},
    headers::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    least_conn,
    maps::BACKENDS,
    packet::{Scratch, copy_addr, copy_key},
    select, service,
    stats::with_stats,
};

/// Of the client's SYN being handled: whether it was checked whole (see
/// `integrity`; it reached the backend) and its sequence number.
#[inline(always)]
pub fn syn_facts(s: &Scratch) -> (bool, u32) {
    // SAFETY: reads of this CPU's scratch area (see `Scratch::syn_verified`).
    unsafe {
        (
            core::ptr::read_volatile(&s.syn_verified) != 0,
            core::ptr::read_volatile(&s.syn_seq),
        )
    }
}

/// Starts a new connect attempt of the flow with the SYN being handled
/// (`syn_facts`): no failure counted for it yet.
#[inline(always)]
pub fn start_attempt(f: &mut Flow, (verified, seq): (bool, u32)) {
    f.syn_seq = seq;
    f.flags &= !(FLOW_F_VERIFIED | FLOW_F_FAILURE_COUNTED);
    if verified {
        f.flags |= FLOW_F_VERIFIED;
    }
}

/// A signal about a flow of `service_id` that is no trustworthy answer to
/// its SYN: counted, and otherwise ignored.
#[inline(always)]
fn untrusted(service_id: u32) {
    with_stats(true, service_id, |st| st.untrusted_signals += 1);
}

/// Whether `ack` (network byte order) acknowledges the flow's SYN: only
/// the backend (or whoever saw the SYN) knows the sequence number.
#[inline(always)]
fn acknowledges_syn(f: &Flow, ack: u32) -> bool {
    u32::from_be(ack) == u32::from_be(f.syn_seq).wrapping_add(1)
}

/// A TCP packet from the client on a known flow: SYN retransmissions
/// (timeouts, retries after a refusal, a reused 5-tuple) and closes. A SYN
/// has been checked (`pipeline::admit_syn`).
#[inline(always)]
pub fn client_tcp(s: &mut Scratch, f: &mut Flow, flags: u8, table: Table) -> Result<(), u32> {
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        if flags & (TCP_FIN | TCP_RST) != 0 {
            close_seen(&s.key, f, flags, FLOW_F_FIN_CLIENT);
        }
        return Ok(());
    }
    let now = failure::now_ns();
    // A retransmitted SYN carries the flow's initial sequence number; a SYN
    // with another one during the connect is a new connection on the same
    // 5-tuple: the client gave up on the last one without a RST Sluice saw
    // (its SYN-ACK lost, or the socket closed while connecting). Taken for a
    // retransmission it would go uncounted, to the old backend, and its
    // SYN-ACK (which acknowledges the new number) would not be trusted, so
    // the flow would never be promoted.
    let state = if syn_facts(s).1 != f.syn_seq
        && matches!(f.state, flow_state::SYN_SENT | flow_state::ESTABLISHED)
    {
        flow_state::CLOSED
    } else {
        f.state
    };
    // One call of `retry` below, however the SYN got there: each call is
    // a copy for the verifier to walk.
    let mut new_connection = false;
    let resend = match state {
        flow_state::SYN_SENT => {
            let Some(policy) = failure::policy(f.service_id) else {
                return Ok(());
            };
            if now.wrapping_sub(f.syn_ns) < policy.connect_timeout_ns {
                return Ok(()); // an early retransmission: same backend
            }
            // The backend's silence counts only if the SYN reached it (this
            // one and the first), and once per attempt.
            if syn_facts(s).0
                && f.flags & (FLOW_F_VERIFIED | FLOW_F_FAILURE_COUNTED) == FLOW_F_VERIFIED
            {
                failure::record_failure(&s.key, f.service_id, f.backend_id, Failure::Timeout, now);
                f.flags |= FLOW_F_FAILURE_COUNTED;
            }
            if policy.flags & SERVICE_F_RETRY == 0 {
                f.syn_ns = now;
                return Ok(());
            }
            Resend::AfterFailure
        }
        flow_state::REFUSED => Resend::AfterFailure,
        flow_state::CLOSED | flow_state::CLOSING | flow_state::UNKNOWN => {
            // The 5-tuple is reused by a new connection (or a flow picked up
            // mid-stream starts over): it starts afresh, on the same backend
            // if that is still healthy and in the service, else where a new
            // flow would go. A new connection, not a retry.
            f.state = flow_state::SYN_SENT;
            f.flags &= !(FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND);
            f.syn_ns = now;
            start_attempt(f, syn_facts(s));
            new_connection = true;
            if !select::is_ejected(f.backend_id) {
                failure::count_connection(f.service_id, f.backend_id);
                return Ok(());
            }
            Resend::NewConnection
        }
        _ => return Ok(()),
    };
    retry(s, f, now, resend, table)?;
    if new_connection {
        failure::count_connection(f.service_id, f.backend_id);
    }
    Ok(())
}

/// A TCP packet from the backend: SYN-ACK (success, latency), RST to a SYN
/// (refused: held back when the service retries), and closes. `ack` is the
/// packet's acknowledgement number (network byte order), `ifindex` where it
/// arrived. Returns an error code when the packet must not be forwarded.
///
/// A SYN-ACK or RST counts only as the answer to the flow's SYN: it must
/// acknowledge the SYN, and a RST must also come from the backend's side
/// (anyone may forge the backend's address). Others are counted as
/// untrusted and forwarded like any packet of the flow.
#[inline(always)]
pub fn backend_tcp(
    s: &mut Scratch,
    reply: &Flow,
    flags: u8,
    ack: u32,
    ifindex: u32,
    table: Table,
) -> Result<(), u32> {
    if flags & (TCP_SYN | TCP_RST | TCP_FIN) == 0 {
        return Ok(()); // data and ACKs: the fast path
    }
    let Some(forward) = forward_of(s, reply, table) else {
        return Ok(());
    };
    // SAFETY: a live conntrack value.
    let f = unsafe { &mut *forward };
    if f.backend_id != reply.backend_id {
        return Ok(()); // a late packet from a backend the flow has left
    }
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        if f.state == flow_state::SYN_SENT {
            if !acknowledges_syn(f, ack) {
                untrusted(f.service_id);
                return Ok(());
            }
            let now = failure::now_ns();
            let latency = now.wrapping_sub(f.syn_ns);
            failure::record_success(&s.reverse_key, f.service_id, f.backend_id, latency, now);
            f.state = flow_state::ESTABLISHED;
            if f.flags & FLOW_F_AFFINITY != 0 {
                // The backend that took the connection (after a retry, not
                // the one the entry named) is the client's from now on.
                affinity::record(
                    &mut s.affinity_key,
                    f.service_id,
                    &s.reverse_key,
                    f.backend_id,
                );
            }
        }
        return Ok(());
    }
    if flags & TCP_RST != 0 && f.state == flow_state::SYN_SENT {
        if flags & TCP_ACK == 0
            || !acknowledges_syn(f, ack)
            || f.flags & FLOW_F_FAILURE_COUNTED != 0
            || !failure::from_backend_side(ifindex, f.backend_id, &f.new_dst)
        {
            untrusted(f.service_id);
            return Ok(());
        }
        f.flags |= FLOW_F_FAILURE_COUNTED;
        let now = failure::now_ns();
        failure::record_failure(
            &s.reverse_key,
            f.service_id,
            f.backend_id,
            Failure::Refused,
            now,
        );
        if failure::retries(f.service_id) {
            // Nothing has flowed yet: the SYN goes to another backend, so
            // the client must not see this refusal. At once when `resyn`
            // can turn this RST into the client's SYN (the entry point
            // tail-calls it on this request); else the client's
            // retransmitted SYN goes there.
            f.state = flow_state::REFUSED;
            if table == Table::HalfOpen {
                request_resyn(s);
            }
            return Err(reason::RST_HELD_FOR_RETRY);
        }
        f.state = flow_state::CLOSED;
        least_conn::closed(f);
        return Ok(());
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        close_seen(&s.reverse_key, f, flags, FLOW_F_FIN_BACKEND);
    }
    Ok(())
}

/// Asks the entry point to tail-call `resyn` for the flow whose forward
/// key `forward_of` left in `s.reverse_key` (the refusal being held back).
#[inline(always)]
fn request_resyn(s: &mut Scratch) {
    copy_key(&mut s.resyn_key, &s.reverse_key);
    // SAFETY: a write to this CPU's scratch area; volatile, so that the
    // entry point reads it back from memory.
    unsafe { core::ptr::write_volatile(&mut s.resyn, 1) };
}

/// A TCP packet of an established flow (`f`, a `CONNTRACK` entry, either
/// direction): FINs and RSTs close it. Connects and their failures are the
/// half-open table's (see `client_tcp`, `backend_tcp`). Returns true when
/// the packet is a client's SYN that starts a new connection on the flow's
/// 5-tuple (the old one is closed, or was picked up mid-stream): the caller
/// makes it a new flow.
#[inline(always)]
pub fn established_tcp(s: &mut Scratch, f: &mut Flow, flags: u8) -> bool {
    let from_client = f.flags & agent_common::FLOW_F_REVERSE == 0;
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return from_client
            && matches!(
                f.state,
                flow_state::CLOSED | flow_state::CLOSING | flow_state::UNKNOWN
            );
    }
    // A DSR connect: the LB never sees the SYN-ACK, so the client's first
    // ACK is what says the connection is made.
    if from_client
        && f.state == flow_state::SYN_SENT
        && f.flags & FLOW_F_DSR != 0
        && flags & TCP_ACK != 0
    {
        f.state = flow_state::ESTABLISHED;
    }
    if flags & (TCP_FIN | TCP_RST) == 0 {
        return false;
    }
    if from_client {
        close_seen(&s.key, f, flags, FLOW_F_FIN_CLIENT);
    } else if let Some(forward) = forward_of(s, f, Table::Established) {
        // SAFETY: a live conntrack value.
        let forward = unsafe { &mut *forward };
        if forward.backend_id == f.backend_id {
            close_seen(&s.reverse_key, forward, flags, FLOW_F_FIN_BACKEND);
        }
    }
    false
}

/// A FIN or RST from one side (`side`: its `FLOW_F_FIN_*` bit) of the flow
/// whose forward entry is `f`, keyed `key`. The first one ends the
/// connection for the counters; the flow is closed (TIME_WAIT for the
/// sweep, its SNAT port free to take) after FINs from both sides or a RST.
#[inline(always)]
pub fn close_seen(key: &FlowKey, f: &mut Flow, flags: u8, side: u32) {
    let rst = flags & TCP_RST != 0;
    match f.state {
        flow_state::ESTABLISHED => {
            failure::count_close(key, f.service_id, f.backend_id, f.syn_ns);
        }
        flow_state::CLOSING | flow_state::UNKNOWN => {}
        _ => return,
    }
    f.flags |= side;
    let both = FLOW_F_FIN_CLIENT | FLOW_F_FIN_BACKEND;
    f.state = if rst || f.flags & both == both {
        least_conn::closed(f);
        flow_state::CLOSED
    } else {
        // The LB sees no FIN of a DSR backend: the client's is the close,
        // for the active count, and the flow lingers only for its closing
        // timeout.
        if f.flags & FLOW_F_DSR != 0 {
            least_conn::closed(f);
        }
        flow_state::CLOSING
    };
}

/// Why a flow's SYN goes to another backend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Resend {
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
pub fn retry(
    s: &mut Scratch,
    f: &mut Flow,
    now: u64,
    why: Resend,
    table: Table,
) -> Result<(), u32> {
    let key = &s.key;
    let Some(service) = service::lookup(
        &mut s.service_key,
        &key.dst,
        key.dport,
        key.proto,
        key.family,
    ) else {
        return Ok(());
    };
    let h = select::first_hash(&service, &s.key);
    let first = match why {
        Resend::AfterFailure => u32::from(f.attempts) + 1,
        Resend::NewConnection => 0,
    };
    let Some((backend_id, attempt)) = select::pick(&service, h, f.backend_id, first) else {
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
    let _ = table.map().remove(&s.reverse_key);
    // Seeded with the current port's offset: the same port is tried first.
    let seed = u32::from(u16::from_be(f.new_sport)).wrapping_sub(u32::from(SNAT_PORT_MIN));
    // A NodePort entry SNATs towards remote backends only: the source
    // follows the new backend (SNAT address and claimed port, or the
    // client's own), as `install_reverse` records the reply direction.
    let snat = snat_for(&service, backend);
    let new_sport = install_reverse(s, &service, backend_id, backend, seed, table, snat)?;
    copy_addr(
        &mut f.new_src,
        if snat { &service.snat_addr } else { &s.key.src },
    );
    least_conn::moved(f, backend_id);
    copy_addr(&mut f.new_dst, &backend.addr);
    f.new_dport = backend.port;
    f.new_sport = new_sport;
    f.backend_id = backend_id;
    f.attempts = attempt.min(255) as u8;
    f.state = flow_state::SYN_SENT;
    f.syn_ns = now;
    start_attempt(f, syn_facts(s));
    if why == Resend::AfterFailure {
        failure::count_retry(&s.key, service.id, backend_id, now);
    }
    Ok(())
}
