//! Connection events to the agent through a ring buffer, rate-limited per
//! CPU by a token bucket so that a flood of connections costs the agent a
//! bounded amount of work (the excess is counted, not queued).

use agent_common::{EVENT_BURST, EVENTS_PER_SECOND, Event, FlowKey};

use crate::maps::{EVENT_BUDGET, EVENTS};

const COST: u64 = 1_000_000_000;

/// Emits one event about the flow whose client → VIP key is `key`.
#[inline(always)]
pub fn emit(
    kind: u8,
    reason: u8,
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    duration_ns: u64,
    now: u64,
) {
    if cfg!(feature = "no-stats") {
        return;
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map.
    let budget = unsafe { &mut *budget };
    let elapsed = now.saturating_sub(budget.last_ns).min(EVENT_BURST * COST);
    budget.last_ns = now;
    budget.tokens = (budget.tokens + elapsed * EVENTS_PER_SECOND).min(EVENT_BURST * COST);
    if budget.tokens < COST {
        budget.dropped += 1;
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        budget.dropped += 1;
        return;
    };
    budget.tokens -= COST;
    budget.sent += 1;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring buffer memory of an Event's
    // size; every field is written before it is submitted.
    unsafe {
        (*event).ts_ns = now;
        (*event).duration_ns = duration_ns;
        (*event).client = key.src;
        (*event).vip = key.dst;
        (*event).client_port = key.sport;
        (*event).vip_port = key.dport;
        (*event).service_id = service_id;
        (*event).backend_id = backend_id;
        (*event).kind = kind;
        (*event).reason = reason;
        (*event).proto = key.proto;
        (*event).family = key.family;
    }
    entry.submit(0);
}
