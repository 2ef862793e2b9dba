//! Failure accounting from real traffic, instant ejection, and the backend
//! choice that skips ejected backends.
//!
//! Counters are per-CPU; the failure streak is a shared word counted with an
//! atomic add. The ejection decision itself is not atomic: two CPUs reaching
//! the threshold at once may both eject (the agent's recount corrects the
//! service's ejected count).

use agent_common::{
    FlowKey, LATENCY_BASE_NS, LATENCY_BUCKETS, NO_BACKEND, Service, ServicePolicy, ServiceStats,
    event_kind, failure_reason, hash,
};
use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::{
    events::emit,
    maps::{
        BACKEND_HEALTH, BACKEND_LATENCY, BACKEND_STATS, MAGLEV, SERVICE_EJECTED, SERVICE_POLICY,
        SERVICE_STATS,
    },
};

/// Rehashes a connection tries while its choice is ejected, then slots
/// walked one by one (see `pick`): with half the backends ejected, all 40
/// miss a healthy one for about one connection in 10^12.
const MAX_PICKS: u32 = 8;
const MAX_WALK: u32 = 32;

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

#[inline(always)]
pub fn with_stats(map_is_service: bool, id: u32, f: impl FnOnce(&mut ServiceStats)) {
    if cfg!(feature = "no-stats") {
        return;
    }
    let slot = if map_is_service {
        SERVICE_STATS.get_ptr_mut(id)
    } else {
        BACKEND_STATS.get_ptr_mut(id)
    };
    if let Some(stats) = slot {
        // SAFETY: this CPU's slot of a per-CPU map; only this CPU writes it.
        f(unsafe { &mut *stats });
    }
}

/// A connect sent again, to `backend_id` now.
#[inline(always)]
pub fn count_retry(key: &FlowKey, service_id: u32, backend_id: u32, now: u64) {
    with_stats(true, service_id, |s| s.retries += 1);
    with_stats(false, backend_id, |s| s.connections += 1);
    emit(event_kind::RETRY, 0, key, service_id, backend_id, 0, now);
}

/// An established connection closes; `since` is its SYN's time.
#[inline(always)]
pub fn count_connection(service_id: u32, backend_id: u32) {
    with_stats(true, service_id, |s| s.connections += 1);
    with_stats(false, backend_id, |s| s.connections += 1);
}

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

#[inline(always)]
pub fn is_ejected(backend_id: u32) -> bool {
    BACKEND_HEALTH
        .get(backend_id)
        .is_some_and(|health| health.ejected != 0)
}

/// Counts a failure of a backend and ejects it on the packet that reaches the
/// service's threshold, unless the service's ejection cap is reached (then it
/// fails open: the backend stays in, and that is counted). The agent logs
/// both as it reads the health words; logging from here would put aya-log's
/// record building on this path.
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
    if health.ejected != 0 || health.consecutive_failures < u64::from(policy.consecutive_failures) {
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
    health.ejected = 1;
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
        unsafe { (*health).consecutive_failures = 0 };
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

/// The Maglev choice for a connection: the slot of its hash, and while that
/// backend is ejected (or is `exclude`, the one that just failed it), the
/// slot of a rehash. Every node with the same healthy set makes the same
/// choice, and an ejected backend's share spreads over all the others in
/// proportion to their weights. Returns the backend id and the attempt that
/// found it.
///
/// Rehashes alone would give up too often: with a third of the slots
/// ejected, one connection in 6,561 sees eight ejected slots in a row (and
/// one in 256 with half of them). After `MAX_PICKS` rehashes the walk goes
/// on slot by slot from the last one (still deterministic); only when
/// `MAX_WALK` more slots are all ejected does it fall back to the first
/// ejected choice (fail open).
#[inline(always)]
pub fn pick(service: &Service, h: u32, exclude: u32, first_attempt: u32) -> Option<(u32, u32)> {
    if service.table_size == 0 {
        return None;
    }
    let mut fallback = None;
    let mut attempt = first_attempt;
    let mut index = 0;
    while attempt < first_attempt + MAX_PICKS {
        let hh = if attempt == 0 {
            h
        } else {
            hash::rehash(h, attempt)
        };
        index = hh % service.table_size;
        match candidate(service, index, exclude)? {
            Candidate::Healthy(id) => return Some((id, attempt)),
            Candidate::Ejected(id) if fallback.is_none() => fallback = Some((id, attempt)),
            _ => {}
        }
        attempt += 1;
    }
    // A second loop rather than one with a branch inside: the verifier
    // explores the branch in every iteration, and one loop of 40 exceeded
    // its instruction budget ("Argument list too long").
    let mut step = 1;
    while step <= MAX_WALK {
        match candidate(service, (index + step) % service.table_size, exclude)? {
            Candidate::Healthy(id) => return Some((id, attempt)),
            Candidate::Ejected(id) if fallback.is_none() => fallback = Some((id, attempt)),
            _ => {}
        }
        step += 1;
    }
    fallback
}

enum Candidate {
    Healthy(u32),
    Ejected(u32),
    Excluded,
}

/// The backend in slot `index` of the service's live table; `None` for an
/// empty slot (a table being built) or one out of the map.
#[inline(always)]
fn candidate(service: &Service, index: u32, exclude: u32) -> Option<Candidate> {
    let id = *MAGLEV.get(service.table_offset + index)?;
    if id == NO_BACKEND {
        return None;
    }
    Some(if id == exclude {
        Candidate::Excluded
    } else if is_ejected(id) {
        Candidate::Ejected(id)
    } else {
        Candidate::Healthy(id)
    })
}
