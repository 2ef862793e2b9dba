//! Failure accounting from real traffic: refused, timed-out and unreachable
//! connects count against the backend and eject it at the service's
//! threshold; SYN-ACKs reset the streak and time the connect.
//!
//! Counters are per-CPU; the failure streak is a shared word counted with an
//! atomic add. The ejection decision itself is not atomic: two CPUs reaching
//! the threshold at once may both eject (the agent's recount corrects the
//! service's ejected count).

use agent_common::{
    BackendHealth, BackendState, FAILING_CLIENTS, FlowKey, LATENCY_BASE_NS, LATENCY_BUCKETS,
    SERVICE_F_RETRY, ServicePolicy, event_kind, failure_reason,
};
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    events::emit,
    maps::{BACKEND_FIB, BACKEND_HEALTH, BACKEND_LATENCY, SERVICE_EJECTED, SERVICE_POLICY},
    stats::with_stats,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    Unreachable,
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn policy(service_id: u32) -> Option<&'static ServicePolicy> {
    SERVICE_POLICY.get(service_id)
}

/// Whether the service sends a refused or timed-out connect to another
/// backend (and so holds the refusal back from the client).
#[inline(always)]
pub fn retries(service_id: u32) -> bool {
    policy(service_id).is_some_and(|p| p.flags & SERVICE_F_RETRY != 0)
}

/// Whether a packet that arrived on `ifindex` came from the backend's side:
/// the interface this host sends to the backend `backend_id` (at `addr`)
/// through, as the FIB cache of its forwarded SYNs says. An answer to a SYN
/// (RST, ICMP error) comes back that way; one from the clients' side is
/// forged. With no cached result (the kernel forwarded the SYN itself, no
/// neighbour yet) nothing came back through here either.
#[inline(always)]
pub fn from_backend_side(ifindex: u32, backend_id: u32, addr: &[u32; 4]) -> bool {
    BACKEND_FIB
        .get(backend_id)
        .is_some_and(|slot| slot.dst == *addr && slot.fib.ifindex == ifindex)
}

/// A connect sent again, to `backend_id` now.
#[inline(always)]
pub fn count_retry(key: &FlowKey, service_id: u32, backend_id: u32, now: u64) {
    with_stats(true, service_id, |s| s.retries += 1);
    with_stats(false, backend_id, |s| s.connections += 1);
    emit(event_kind::RETRY, 0, key, service_id, backend_id, 0, now);
}

/// A new connection to `backend_id`.
#[inline(always)]
pub fn count_connection(service_id: u32, backend_id: u32) {
    with_stats(true, service_id, |s| s.connections += 1);
    with_stats(false, backend_id, |s| s.connections += 1);
}

/// An established connection closes; `since` is its SYN's time.
#[inline(always)]
pub fn count_close(key: &FlowKey, service_id: u32, backend_id: u32, since: u64) {
    with_stats(true, service_id, |s| s.closed += 1);
    with_stats(false, backend_id, |s| s.closed += 1);
    let now = now_ns();
    emit(
        event_kind::CLOSE,
        0,
        key,
        service_id,
        backend_id,
        now.saturating_sub(since),
        now,
    );
}

/// Counts a failure of a backend (of the connect of `key`, client → VIP)
/// and ejects it on the packet that reaches the service's threshold, once
/// connects of enough distinct clients have failed, unless the service's
/// ejection cap is reached (then it fails open: the backend stays in, and
/// that is counted). The agent logs both as it reads the health words;
/// logging from here would put aya-log's record building on this path.
#[inline(always)]
pub fn record_failure(key: &FlowKey, service_id: u32, backend_id: u32, failure: Failure, now: u64) {
    with_stats(false, backend_id, |s| match failure {
        Failure::Refused => s.failures_refused += 1,
        Failure::Timeout => s.failures_timeout += 1,
        Failure::Unreachable => s.failures_unreachable += 1,
    });
    let reason = match failure {
        Failure::Refused => failure_reason::REFUSED,
        Failure::Timeout => failure_reason::TIMEOUT,
        Failure::Unreachable => failure_reason::UNREACHABLE,
    };
    emit(
        event_kind::FAIL,
        reason,
        key,
        service_id,
        backend_id,
        0,
        now,
    );
    let (Some(policy), Some(health)) = (policy(service_id), BACKEND_HEALTH.get_ptr_mut(backend_id))
    else {
        return;
    };
    // SAFETY: a shared array slot; see the module note on races.
    let health = unsafe { &mut *health };
    // An atomic add (BPF XADD): two CPUs counting failures of one backend at
    // once must both count, or an ejection comes a failure late.
    // SAFETY: an aligned u64 inside a live map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut health.consecutive_failures,
            1,
        );
    }
    let clients = note_failing_client(health, client_tag(&key.src));
    if health.ejected != BackendState::Active as u32
        || health.consecutive_failures < u64::from(policy.consecutive_failures)
        || clients < policy.min_distinct_clients.min(FAILING_CLIENTS as u32)
    {
        return;
    }
    let Some(ejected) = SERVICE_EJECTED.get_ptr_mut(service_id) else {
        return;
    };
    // SAFETY: as above.
    let ejected = unsafe { &mut *ejected };
    if *ejected >= policy.max_ejected {
        // The agent logs this when it sees the counter move.
        with_stats(true, service_id, |s| s.fail_open += 1);
        return;
    }
    *ejected += 1;
    health.ejected = BackendState::Ejected as u32;
    health.ejections += 1;
    health.ejected_ns = now;
    emit(
        event_kind::EJECT,
        reason,
        key,
        service_id,
        backend_id,
        0,
        now,
    );
}

/// A nonzero tag of a client address (a socket-level connect puts its
/// network namespace's cookie there): distinct clients get distinct tags
/// but for rare collisions, which only delay an ejection.
#[inline(always)]
fn client_tag(src: &[u32; 4]) -> u32 {
    let tag = src[0] ^ src[1].rotate_left(8) ^ src[2].rotate_left(16) ^ src[3].rotate_left(24);
    if tag == 0 { 1 } else { tag }
}

/// Adds `tag` to the backend's failing clients of the current streak and
/// returns how many distinct ones it holds. Not atomic: two CPUs adding two
/// new clients at once may keep one, which delays an ejection by a failure.
#[inline(always)]
fn note_failing_client(health: &mut BackendHealth, tag: u32) -> u32 {
    let (mut distinct, mut seen, mut free) = (0, false, FAILING_CLIENTS);
    let mut i = 0;
    while i < FAILING_CLIENTS {
        let slot = health.failing_clients[i];
        if slot == 0 {
            if free == FAILING_CLIENTS {
                free = i;
            }
        } else {
            distinct += 1;
            seen |= slot == tag;
        }
        i += 1;
    }
    if !seen && free < FAILING_CLIENTS {
        health.failing_clients[free] = tag;
        distinct += 1;
    }
    distinct
}

/// A SYN-ACK: the backend answers; its consecutive failures start over and
/// the connect latency goes into its histogram.
#[inline(always)]
pub fn record_success(key: &FlowKey, service_id: u32, backend_id: u32, latency_ns: u64, now: u64) {
    emit(
        event_kind::OPEN,
        0,
        key,
        service_id,
        backend_id,
        latency_ns,
        now,
    );
    if let Some(health) = BACKEND_HEALTH.get_ptr_mut(backend_id) {
        // SAFETY: a shared array slot; see the module note on races.
        let health = unsafe { &mut *health };
        // Written only when set: a store per connect would bounce the slot's
        // cache line between CPUs for nothing.
        if health.consecutive_failures != 0 {
            health.consecutive_failures = 0;
            let mut i = 0;
            while i < FAILING_CLIENTS {
                health.failing_clients[i] = 0;
                i += 1;
            }
        }
    }
    with_stats(true, service_id, |s| s.opened += 1);
    with_stats(false, backend_id, |s| s.opened += 1);
    if cfg!(feature = "no-stats") {
        return;
    }
    let Some(hist) = BACKEND_LATENCY.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map.
    let hist = unsafe { &mut *hist };
    hist.count += 1;
    hist.sum_ns += latency_ns;
    let mut i = 0;
    let mut bound = LATENCY_BASE_NS;
    while i < LATENCY_BUCKETS && latency_ns >= bound {
        i += 1;
        bound <<= 1;
    }
    if i < LATENCY_BUCKETS {
        hist.buckets[i] += 1;
    }
}
