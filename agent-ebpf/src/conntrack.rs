//! Stage 3: connection tracking. Every flow has two entries: the forward one
//! (client → VIP, which holds the connection's state) and the reply one
//! (backend → client or SNAT address). With SNAT the reply entry is also the
//! port reservation. Both live in one table: `HALF_OPEN` while a TCP
//! connect is being made, `CONNTRACK` once established (see `Table`).
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use agent_common::{
    Backend, FLOW_F_DSR, FLOW_F_REVERSE, Flow, FlowKey, SNAT_PORT_ATTEMPTS, SNAT_PORT_MAX,
    SNAT_PORT_MIN, Service, flow_state, reason,
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap};

use crate::{
    maps::{CONNTRACK, HALF_OPEN, SNAT_CURSOR},
    packet::{Scratch, copy_addr},
};

/// Which map holds a flow's two entries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `CONNTRACK`: established TCP connections, UDP flows, and TCP flows
    /// picked up mid-stream.
    Established,
    /// `HALF_OPEN`: a TCP connect, from the client's SYN until the client
    /// acknowledges the backend's SYN-ACK (then it moves, see `promote`).
    HalfOpen,
}

impl Table {
    #[inline(always)]
    pub fn map(self) -> &'static LruHashMap<FlowKey, Flow> {
        match self {
            Table::Established => &CONNTRACK,
            Table::HalfOpen => &HALF_OPEN,
        }
    }
}

/// Seconds of the coarse monotonic clock: cheap enough for every packet.
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Marks a tracked flow as seen now. Written only when it changes: a store
/// per packet would bounce the entry's cache line between CPUs for nothing.
#[inline(always)]
pub fn touch(f: &mut Flow) {
    let now = now_seconds();
    if f.last_seen != now {
        f.last_seen = now;
    }
}

/// The forward entry of the flow whose reply entry is `reply` (in
/// `table`). The state lives there; its key is the reply's rewrite turned
/// around (client → VIP).
#[inline(always)]
pub fn forward_of(s: &mut Scratch, reply: &Flow, table: Table) -> Option<*mut Flow> {
    answer_key(&mut s.reverse_key, reply, s.key.proto, s.key.family);
    table.map().get_ptr_mut(&s.reverse_key)
}

/// Moves the flow whose forward entry (key `s.key`) is copied in
/// `s.forward` from `HALF_OPEN` to `CONNTRACK`: the client has acknowledged
/// the backend's SYN-ACK, so the connection is real. Reply entry first, as
/// for a new flow. If `CONNTRACK` refuses, the flow stays half-open.
#[inline(always)]
pub fn promote(s: &mut Scratch) {
    answer_key(&mut s.reverse_key, &s.forward, s.key.proto, s.key.family);
    let Some(reply) = HALF_OPEN.get_ptr_mut(&s.reverse_key) else {
        return;
    };
    // SAFETY: a live map value, copied before it is deleted.
    if CONNTRACK
        .insert(&s.reverse_key, unsafe { &*reply }, 0)
        .is_err()
    {
        return;
    }
    if CONNTRACK.insert(&s.key, &s.forward, 0).is_err() {
        let _ = CONNTRACK.remove(&s.reverse_key);
        return;
    }
    let _ = HALF_OPEN.remove(&s.key);
    let _ = HALF_OPEN.remove(&s.reverse_key);
}

/// Deletes both entries of the established flow whose forward entry (key
/// `s.key`) is `f`: a new connection takes its 5-tuple.
#[inline(always)]
pub fn forget(s: &mut Scratch, f: &Flow) {
    // A direct-server-return flow has no reply entry: the key its reply
    // would have may be another flow's.
    if f.flags & FLOW_F_DSR == 0 {
        answer_key(&mut s.reverse_key, f, s.key.proto, s.key.family);
        let _ = CONNTRACK.remove(&s.reverse_key);
    }
    let _ = CONNTRACK.remove(&s.key);
}

/// Copies a flow value field by field into `to` (a struct copy becomes a
/// memcpy call in BPF code).
#[inline(always)]
pub fn copy_flow(to: &mut Flow, from: &Flow) {
    fill(
        to,
        &from.new_src,
        from.new_sport,
        &from.new_dst,
        from.new_dport,
        from.backend_id,
        from.service_id,
    );
    to.flags = from.flags;
    to.fib.ifindex = from.fib.ifindex;
    to.fib.stamp = from.fib.stamp;
    to.fib.macs[0] = from.fib.macs[0];
    to.fib.macs[1] = from.fib.macs[1];
    to.fib.macs[2] = from.fib.macs[2];
    to.state = from.state;
    to.attempts = from.attempts;
    to.last_seen = from.last_seen;
    to.syn_seq = from.syn_seq;
    to.syn_ns = from.syn_ns;
}

/// The 5-tuple of the packets that answer those `flow` rewrites: its new
/// destination and source, turned around. (The forward entry's answer is the
/// reply direction, and the reply entry's answer is the forward direction.)
#[inline(always)]
pub fn answer_key(key: &mut FlowKey, flow: &Flow, proto: u8, family: u8) {
    copy_addr(&mut key.src, &flow.new_dst);
    copy_addr(&mut key.dst, &flow.new_src);
    key.sport = flow.new_dport;
    key.dport = flow.new_sport;
    key.proto = proto;
    key.family = family;
    key._pad = 0;
}

/// Records the reply direction of the flow in `s.key` towards `backend`
/// in `table` and returns the source port its forward packets must carry.
/// With SNAT the reply entry is the port reservation: `BPF_NOEXIST` claims
/// a (backend, SNAT address, port) atomically across CPUs, starting at
/// `port_seed` within the SNAT range. A reply tuple must be free in both
/// tables; one held by an established flow is checked first (a connect
/// made at that moment could slip past, which the port cursor makes as
/// rare as a wrap of the whole range). `snat`: whether this flow is SNATed
/// (`agent_common::snat_for` of the service and backend), decided once by
/// the caller.
#[inline(always)]
pub fn install_reverse(
    s: &mut Scratch,
    service: &Service,
    backend_id: u32,
    backend: &Backend,
    port_seed: u32,
    table: Table,
    snat: bool,
) -> Result<u16, u32> {
    let map = table.map();
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
        // Taken: by an earlier life of this same flow (overwrite it), or by
        // another flow whose replies would then be mistranslated (refuse).
        let same_flow = |other: *mut Flow| {
            // SAFETY: a live conntrack value, read field by field.
            unsafe { (*other).new_src == key.dst && (*other).new_sport == key.dport }
        };
        if table == Table::HalfOpen
            && let Some(other) = CONNTRACK.get_ptr_mut(&s.reverse_key)
        {
            if !same_flow(other) {
                return Err(reason::REPLY_CONFLICT);
            }
            // An established entry of this flow's earlier life (its forward
            // entry evicted) would shadow the new one: looked up first, it
            // would take the SYN-ACK the connect waits for. (Only when there
            // is one: a new flow's usual case is none, and a delete is a
            // second hash and bucket walk.)
            let _ = CONNTRACK.remove(&s.reverse_key);
        }
        if map
            .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(key.sport);
        }
        if map
            .get_ptr_mut(&s.reverse_key)
            .is_some_and(|other| !same_flow(other))
        {
            return Err(reason::REPLY_CONFLICT);
        }
        return if map.insert(&s.reverse_key, &s.reverse, 0).is_ok() {
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
        // Held by an established flow (even a closed one, whose TIME_WAIT
        // the sweep ends): the next port.
        let free_there =
            table == Table::Established || CONNTRACK.get_ptr_mut(&s.reverse_key).is_none();
        if free_there
            && (map
                .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
                .is_ok()
                || release_if_closed(s, table)
                    && map
                        .insert(&s.reverse_key, &s.reverse, u64::from(BPF_NOEXIST))
                        .is_ok())
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
pub fn snat_seed() -> u32 {
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

/// The reply tuple in `s.reverse_key` is taken in `table`: frees it if the
/// flow that holds it is closed (its TIME_WAIT needs no reserved port: a SYN
/// on it is a new connection anyway), or gone. Returns whether it was freed.
#[inline(always)]
fn release_if_closed(s: &mut Scratch, table: Table) -> bool {
    let map = table.map();
    let Some(old) = map.get_ptr_mut(&s.reverse_key) else {
        return true; // freed meanwhile
    };
    // SAFETY: a live conntrack value.
    let old = unsafe { &*old };
    answer_key(&mut s.old_key, old, s.key.proto, s.key.family);
    let closed = match map.get_ptr_mut(&s.old_key) {
        // SAFETY: a live conntrack value.
        Some(forward) => unsafe { (*forward).state == flow_state::CLOSED },
        None => now_seconds().wrapping_sub(old.last_seen) >= ORPHAN_GRACE_SECONDS,
    };
    if !closed {
        return false;
    }
    let _ = map.remove(&s.old_key);
    let _ = map.remove(&s.reverse_key);
    true
}

/// Fills a flow value field by field: a struct literal with zeroed parts
/// becomes memset calls (byte loops) in BPF code.
#[inline(always)]
pub fn fill(
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
    f.syn_seq = 0;
}
