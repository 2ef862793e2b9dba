//! Budgets that keep a flood from costing more than it may: new flows per
//! service and CPU per second (past it, new flows are dropped and counted),
//! and log records per CPU per second. Per CPU, so taking from a budget is a
//! plain add to this CPU's slot, with no shared cache line.

use agent_common::FlowBudget;
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

use crate::{
    failure::policy,
    maps::{FLOW_BUDGET, LOG_BUDGET},
};

const WINDOW_NS: u64 = 1_000_000_000;

/// Log records each CPU may write per second: enough to see what happens,
/// too few for a flood to fill the log ring or the agent's log.
const LOG_RECORDS_PER_SECOND: u64 = 10;

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call. The coarse clock: a tick is precise enough
    // for one-second windows and cheaper than the fine one.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Takes one new flow from the service's budget on this CPU; false when the
/// budget of this second is spent.
#[inline(always)]
pub fn take(service_id: u32) -> bool {
    let limit = policy(service_id).map_or(0, |p| p.new_flows_per_second);
    if limit == 0 {
        return true;
    }
    let Some(slot) = FLOW_BUDGET.get_ptr_mut(service_id) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU map.
    let slot: &mut FlowBudget = unsafe { &mut *slot };
    let now = now_ns();
    if now.wrapping_sub(slot.window_ns) >= WINDOW_NS {
        slot.window_ns = now;
        slot.used = 0;
    }
    if slot.used >= limit {
        return false;
    }
    slot.used += 1;
    true
}

/// Whether this CPU may write a log record now.
#[inline(always)]
pub fn may_log() -> bool {
    let Some(slot) = LOG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU map.
    let slot = unsafe { &mut *slot };
    // [0]: window start, [1]: records written in it.
    let now = now_ns();
    if now.wrapping_sub(slot[0]) >= WINDOW_NS {
        slot[0] = now;
        slot[1] = 0;
    }
    if slot[1] >= LOG_RECORDS_PER_SECOND {
        return false;
    }
    slot[1] += 1;
    true
}
