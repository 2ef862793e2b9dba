//! Least connections (`SERVICE_F_LEAST_CONN`): the kernel's own count of
//! each backend's active flows (`BACKEND_ACTIVE`, one word per backend
//! shared by all CPUs, changed only by atomic adds), and a power-of-two-
//! choices pick weighted by backend weight (IPVS's `wlc`, sampled).
//!
//! A flow of such a service counts once: +1 when it is created (its
//! forward entry then carries `FLOW_F_ACTIVE_COUNTED`), moved when a retry
//! sends it to another backend, −1 when it closes (a RST, FINs from both
//! sides, a refusal not retried, a new connection on its 5-tuple); the
//! bit is cleared then, so no flow is taken off twice. Flows that end
//! silently (the agent's sweep expires them; the LRU evicts them) are the
//! agent's: after each sweep it recounts the live counted flows and
//! corrects the words (see the agent's `sweep.rs`).

use agent_common::{FLOW_F_ACTIVE_COUNTED, Flow, NO_BACKEND, Service};
use aya_ebpf::helpers::bpf_get_prandom_u32;

use crate::{
    maps::{BACKEND_ACTIVE, BACKENDS, MAGLEV},
    select::is_ejected,
};

/// Adds `delta` (two's complement) to the active count of `backend_id`.
#[inline(always)]
fn add(backend_id: u32, delta: u64) {
    if let Some(word) = BACKEND_ACTIVE.get_ptr_mut(backend_id) {
        // An atomic add (BPF XADD): every CPU's opens and closes count.
        // SAFETY: an aligned u64 inside a live map value.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                word, delta,
            );
        }
    }
}

/// The active count of `backend_id`. The agent's correction races with the
/// kernel's adds and may leave a word one or two below the truth for a
/// sweep's time, even below zero: read as signed, and at least zero.
#[inline(always)]
fn active(backend_id: u32) -> u64 {
    BACKEND_ACTIVE
        .get(backend_id)
        .map_or(0, |n| (*n as i64).max(0) as u64)
}

/// A new flow whose entry is in place: counted if it is to be
/// (`FLOW_F_ACTIVE_COUNTED`, set for a least-connections service).
#[inline(always)]
pub fn opened(f: &Flow) {
    if f.flags & FLOW_F_ACTIVE_COUNTED != 0 {
        add(f.backend_id, 1);
    }
}

/// The flow `f` closed: taken off its backend's count, once.
#[inline(always)]
pub fn closed(f: &mut Flow) {
    if f.flags & FLOW_F_ACTIVE_COUNTED != 0 {
        f.flags &= !FLOW_F_ACTIVE_COUNTED;
        add(f.backend_id, u64::MAX);
    }
}

/// A retry moves the counted flow `f` from its backend to `to`.
#[inline(always)]
pub fn moved(f: &Flow, to: u32) {
    if f.flags & FLOW_F_ACTIVE_COUNTED != 0 && f.backend_id != to {
        add(f.backend_id, u64::MAX);
        add(to, 1);
    }
}

/// How far the second candidate's slot is walked past slots of the first
/// candidate's backend: with two backends, half the random slots hold the
/// first one, and a pair of one backend is no choice. Eight slots of one
/// backend in a row are rare (one draw in 256 with two backends of equal
/// weight, one in 6,561 with three); then the first stands alone. (A
/// second `select::pick` from the random hash, excluding the first, would
/// never fail, but costs the verifier 120,000 more instructions.)
const SECOND_WALK: u32 = 8;

/// Power of two choices: `first` (the Maglev choice, healthy if any
/// backend is) against the backend of a random slot of the service's table
/// (or of the next slots, past those holding `first`), whichever has fewer
/// active connections for its weight (a tie keeps the Maglev choice). The
/// table holds each backend in proportion to its weight, so the random
/// slot samples backends by weight, as the first does. The second draw is
/// `bpf_get_prandom_u32`, not a hash of the flow: the two candidates are
/// independent (a rehash would tie the pair to the 5-tuple, the same pair
/// for every retransmission and every client that chose those ports). An
/// empty, ejected or draining second candidate leaves `first`.
#[inline(always)]
pub fn choose(service: &Service, first: u32) -> u32 {
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() } % service.table_size;
    let mut second = NO_BACKEND;
    let mut step = 0;
    while step < SECOND_WALK {
        match MAGLEV.get(service.table_offset + (r + step) % service.table_size) {
            Some(&id) if id != first => {
                second = id;
                break;
            }
            Some(_) => {}
            None => break,
        }
        step += 1;
    }
    if second == NO_BACKEND || is_ejected(second) {
        return first;
    }
    let (Some(a), Some(b)) = (BACKENDS.get(first), BACKENDS.get(second)) else {
        return first;
    };
    // a_conns / a_weight > b_conns / b_weight, without division.
    if active(first) * u64::from(b.weight) > active(second) * u64::from(a.weight) {
        second
    } else {
        first
    }
}
