//! Counters: packets that left the fast path by reason (with the reason's
//! fixed action), and traffic per service and backend.

use agent_common::{ServiceStats, reason};

use crate::{
    maps::{BACKEND_STATS, REASONS, SERVICE_STATS},
    packet::{Action, Ctx},
};

/// Counts a packet that left the fast path, by reason.
#[inline(always)]
pub fn count(code: u32) {
    if let Some(n) = REASONS.get_ptr_mut(code) {
        // SAFETY: per-CPU slot, no other writer while this program runs here.
        unsafe { *n += 1 };
    }
}

/// Counts the reason and applies its fixed action.
#[inline(always)]
pub fn exception(code: u32) -> Action {
    count(code);
    if reason::DROPPED_MASK & (1 << (code & 31)) != 0 {
        Action::Drop
    } else {
        Action::Pass
    }
}

/// Traffic of a forwarded packet, for its service and backend.
#[inline(always)]
pub fn account(service_id: u32, backend_id: u32, to_backend: bool, ctx: &Ctx) {
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
fn add_traffic(stats: *mut ServiceStats, to_backend: bool, bytes: u64) {
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

/// Updates one counter block: a service's (`map_is_service`) or a backend's.
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
