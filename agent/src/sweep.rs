//! The conntrack sweep: flows idle longer than their state's timeout are
//! removed (both entries, so an SNAT flow's port returns to the pool), and
//! the entries are counted by state.
//!
//! The kernel programs keep each entry's `last_seen` (coarse seconds) and
//! TCP state; an LRU map alone would keep closed flows, and their SNAT
//! ports, until it is full.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use agent_common::{FLOW_F_ACTIVE_COUNTED, FLOW_F_REVERSE, Flow, FlowKey, PROTO_UDP, flow_state};
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData};
use tracing::debug;

use crate::{config::ConntrackTimeouts, counters::Counters, state::Shared, view::View};

/// How often the map is swept: a read costs one syscall per 4,096 entries
/// and a removal one per idle flow.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// A flow's state as `sluice_conntrack_entries{state}` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlowState {
    SynSent,
    Established,
    Closing,
    TimeWait,
    Udp,
    /// A reply entry whose forward entry is gone (evicted).
    Orphan,
}

impl FlowState {
    pub const ALL: [FlowState; 6] = [
        Self::SynSent,
        Self::Established,
        Self::Closing,
        Self::TimeWait,
        Self::Udp,
        Self::Orphan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::SynSent => "syn_sent",
            Self::Established => "established",
            Self::Closing => "closing",
            Self::TimeWait => "time_wait",
            Self::Udp => "udp",
            Self::Orphan => "orphan",
        }
    }

    /// The state of a forward entry, and its idle timeout in seconds.
    pub(crate) fn of(key: &FlowKey, flow: &Flow, t: &ConntrackTimeouts) -> (Self, u32) {
        if key.proto == PROTO_UDP {
            return (Self::Udp, t.udp);
        }
        match flow.state {
            flow_state::SYN_SENT | flow_state::REFUSED => (Self::SynSent, t.tcp_syn_sent),
            flow_state::CLOSING => (Self::Closing, t.tcp_closing),
            flow_state::CLOSED => (Self::TimeWait, t.tcp_time_wait),
            // ESTABLISHED, or picked up mid-stream (after a restart).
            _ => (Self::Established, t.tcp_established),
        }
    }
}

/// Entries by state after a sweep.
pub type StateCounts = BTreeMap<FlowState, u64>;

/// Seconds of `CLOCK_MONOTONIC_COARSE`, the clock of `bpf_ktime_get_coarse_ns`.
pub(crate) fn now_seconds() -> u32 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// Seconds since `last_seen` (the kernel's clock wraps like ours).
pub(crate) fn idle(now: u32, last_seen: u32) -> u32 {
    now.wrapping_sub(last_seen).min(i32::MAX as u32)
}

/// The key of the packets that answer what `flow` rewrites to: for a
/// forward entry, its reply entry's key.
fn answer_key(key: &FlowKey, flow: &Flow) -> FlowKey {
    FlowKey {
        src: flow.new_dst,
        dst: flow.new_src,
        sport: flow.new_dport,
        dport: flow.new_sport,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    }
}

/// What one sweep did.
#[derive(Debug, Default)]
struct Swept {
    pub counts: StateCounts,
    pub removed_flows: u64,
    /// Established connections removed as idle, by backend id.
    pub expired_established: BTreeMap<u32, u64>,
    /// Established connections still in the map, by backend id.
    pub established: BTreeMap<u32, u64>,
    /// Flows still in the map that the kernel counts as active
    /// (`FLOW_F_ACTIVE_COUNTED`), by backend id.
    pub counted: BTreeMap<u32, u64>,
}

/// Sweeps `map` once: removes the flows idle past their timeout at `now`.
fn sweep(
    map: &mut BpfHashMap<MapData, FlowKey, Flow>,
    capacity: u32,
    timeouts: &ConntrackTimeouts,
    now: u32,
) -> Swept {
    let mut forwards = Vec::new();
    let mut replies: HashMap<FlowKey, Flow> = HashMap::new();
    // Read in batches (a key-by-key walk of a full table cost two syscalls
    // per entry, a tenth of a CPU at 250,000 entries). The map changes
    // during the read: bounded by the capacity, the counts are approximate.
    let entries = match crate::batch::hash_entries::<FlowKey, Flow>(map.map(), capacity as usize) {
        Ok(entries) => entries,
        Err(e) => {
            // A kernel without batch reads of LRU maps (before 5.6): the
            // walk, two syscalls per entry, rather than no sweep at all.
            warn_once(&e);
            map.iter()
                .take(capacity as usize)
                .map_while(Result::ok)
                .collect()
        }
    };
    for (key, flow) in entries {
        if flow.flags & FLOW_F_REVERSE != 0 {
            replies.insert(key, flow);
        } else {
            forwards.push((key, flow));
        }
    }
    let mut swept = Swept::default();
    for (key, flow) in forwards {
        let reply_key = answer_key(&key, &flow);
        // Not in the walk is not gone: the walk misses keys while the map
        // changes, so a missing reply entry is looked up.
        let reply_seen = replies
            .remove(&reply_key)
            .or_else(|| map.get(&reply_key, 0).ok())
            .map(|r| r.last_seen);
        let entries = 1 + u64::from(reply_seen.is_some());
        let (state, timeout) = FlowState::of(&key, &flow, timeouts);
        let last = reply_seen.map_or(flow.last_seen, |r| {
            // The later of the two, on a wrapping clock.
            if r.wrapping_sub(flow.last_seen) as i32 > 0 {
                r
            } else {
                flow.last_seen
            }
        });
        // Re-read before deleting: a packet may have come since the walk.
        let still_idle = idle(now, last) >= timeout
            && map
                .get(&key, 0)
                .is_ok_and(|f| f.last_seen == flow.last_seen && f.state == flow.state);
        if still_idle {
            let _ = map.remove(&key);
            if reply_seen.is_some() {
                let _ = map.remove(&reply_key);
            }
            swept.removed_flows += 1;
            if flow.state == flow_state::ESTABLISHED {
                *swept
                    .expired_established
                    .entry(flow.backend_id)
                    .or_default() += 1;
            }
        } else {
            *swept.counts.entry(state).or_default() += entries;
            if flow.state == flow_state::ESTABLISHED {
                *swept.established.entry(flow.backend_id).or_default() += 1;
            }
            if flow.flags & FLOW_F_ACTIVE_COUNTED != 0 {
                *swept.counted.entry(flow.backend_id).or_default() += 1;
            }
        }
    }
    // Reply entries the walk found no forward entry for: the forward entry
    // may be there all the same (the walk misses keys while the map
    // changes), so it is looked up before anything goes. One truly alone
    // serves nothing (a new packet of the flow makes both anew); it is kept
    // briefly, since a new flow's reply entry is written just before its
    // forward entry.
    for (key, reply) in replies {
        if map.get(&answer_key(&key, &reply), 0).is_ok() {
            continue; // counted with its flow, or the flow is new
        }
        if idle(now, reply.last_seen) >= timeouts.tcp_time_wait {
            let _ = map.remove(&key);
        } else {
            *swept.counts.entry(FlowState::Orphan).or_default() += 1;
        }
    }
    swept
}

/// Says once per agent that the batch read failed and the sweep walks the
/// table key by key instead.
fn warn_once(e: &std::io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(error = %e, "conntrack batch read refused; sweeping key by key (slower)");
    });
}

/// Established connections the LRU evicted from a full map: nothing in the
/// kernel sees them go, so they are found as the difference between the
/// connections counted open and those the sweep finds: opened before the
/// walk (one opened during it may be found, never missed) minus closed by
/// its end (one that closed during it is not found). Only while the map is
/// nearly full (three quarters: the LRU map evicts before it is quite
/// full; with room, nothing is evicted), and only a difference seen by two
/// sweeps in a row.
#[derive(Default)]
struct Evictions {
    /// Backend id → connections opened, read before the walk; empty while
    /// the map has room.
    opened_before: BTreeMap<u32, u64>,
    /// Backend id → the difference the last sweep saw.
    last: BTreeMap<u32, u64>,
    /// The last walk found the map at least three quarters full.
    near_full: bool,
}

impl Evictions {
    /// Before a walk: reads the opened counts if the last walk found the
    /// map nearly full.
    fn before_walk(&mut self, view: &View) {
        self.opened_before.clear();
        if self.last.is_empty() && !self.near_full {
            return;
        }
        for id in view.snapshot().backend_ids() {
            self.opened_before
                .insert(id, view.counters.stats(false, id).opened);
        }
    }

    fn follow(&mut self, r: &Counters, swept: &Swept, total: u64, capacity: u32) {
        self.near_full = total * 4 >= u64::from(capacity) * 3;
        if !self.near_full || self.opened_before.is_empty() {
            self.last.clear();
            return;
        }
        let mut now = BTreeMap::new();
        for (&id, &opened) in &self.opened_before {
            let closed = r.stats(false, id).closed;
            let open = opened.saturating_sub(closed);
            let found = swept.established.get(&id).copied().unwrap_or(0);
            let missing = open.saturating_sub(found);
            if missing == 0 {
                continue;
            }
            if let Some(before) = self.last.get(&id) {
                let evicted = missing.min(*before);
                r.ended_silently.add(id, evicted);
                debug!(
                    backend_id = id,
                    connections = evicted,
                    "evicted connections counted as closed"
                );
            } else {
                now.insert(id, missing);
            }
        }
        self.last = now;
    }
}

/// The kernel's active-flow counts of least-connections services
/// (`BACKEND_ACTIVE`), corrected after each sweep. The kernel adds one
/// when a counted flow opens and takes one off when it closes; a flow that
/// ends silently (expired by this sweep, evicted by the LRU, deleted with
/// an ended backend) is never taken off there. So after each sweep the
/// words are compared with the counted flows the walks found.
///
/// Racy, and self-correcting: flows open and close between the walk and
/// the read of the words, so a difference seen once is most likely such a
/// flow, and is left alone; the same difference in two sweeps in a row
/// (two seconds apart) is a leak, and the word is set to the walks'
/// count. A kernel add in the instant of that write is lost, and found by
/// the next two sweeps. The kernel reads a word as signed and at least
/// zero, so an error meanwhile never makes a backend look busier than
/// zero connections below the truth.
pub struct ActiveCounts {
    pub map: Array<MapData, u64>,
    /// Backend slots (`limits.max_backends`).
    pub capacity: u32,
    /// The differences (word − walks' count) of the last sweep, by backend id.
    pub suspect: HashMap<u32, i64>,
}

impl ActiveCounts {
    /// Compares the words with `live` (counted flows by backend id) and
    /// corrects the differences seen twice in a row.
    fn correct(&mut self, live: &BTreeMap<u32, u64>) {
        let values = match crate::batch::array_values::<u64>(self.map.map(), self.capacity, 1) {
            Ok(values) => values,
            Err(e) => {
                debug!(error = %e, "reading BACKEND_ACTIVE");
                return;
            }
        };
        let mut suspect = HashMap::new();
        for (id, &have) in values.iter().enumerate() {
            let id = id as u32;
            let want = live.get(&id).copied().unwrap_or(0);
            let diff = (have as i64).wrapping_sub(want as i64);
            if diff == 0 {
                continue;
            }
            if self.suspect.get(&id) == Some(&diff) {
                debug!(
                    backend_id = id,
                    counted = have as i64,
                    live = want,
                    "active count corrected"
                );
                let _ = self.map.set(id, want, 0);
            } else {
                suspect.insert(id, diff);
            }
        }
        self.suspect = suspect;
    }
}

/// The maps the sweep walks, on handles of its own.
pub struct Tables {
    pub conntrack: BpfHashMap<MapData, FlowKey, Flow>,
    pub conntrack_capacity: u32,
    pub half_open: BpfHashMap<MapData, FlowKey, Flow>,
    pub half_open_capacity: u32,
    pub active: ActiveCounts,
}

/// Sweeps the conntrack maps on a thread of its own (a walk of a large map
/// must hold up neither scrapes nor reconciliation), with the timeouts the
/// current config sets.
pub fn spawn(tables: Tables, shared: Arc<Shared>, view: Arc<View>) {
    let Tables {
        conntrack: mut map,
        conntrack_capacity: capacity,
        mut half_open,
        half_open_capacity,
        mut active,
    } = tables;
    let mut evictions = Evictions::default();
    std::thread::spawn(move || {
        while !shared.stopping.load(Ordering::SeqCst) {
            let timeouts = *shared.conntrack_timeouts.lock().unwrap();
            // A connect whose SYN-ACK came but whose client never
            // acknowledged it is half-open still: the SYN_SENT timeout.
            let connecting = ConntrackTimeouts {
                tcp_established: timeouts.tcp_syn_sent,
                ..timeouts
            };
            let opening = sweep(
                &mut half_open,
                half_open_capacity,
                &connecting,
                now_seconds(),
            );
            for (backend_id, n) in &opening.expired_established {
                view.counters.ended_silently.add(*backend_id, *n);
            }
            evictions.before_walk(&view);
            let mut swept = sweep(&mut map, capacity, &timeouts, now_seconds());
            if swept.removed_flows > 0 {
                debug!(
                    flows = swept.removed_flows,
                    "conntrack sweep removed idle flows"
                );
            }
            let total: u64 = swept.counts.values().sum();
            for (backend_id, n) in &swept.expired_established {
                view.counters.ended_silently.add(*backend_id, *n);
            }
            // Connections the SYN-ACK opened are established for the
            // eviction count wherever they are.
            for (backend_id, n) in &opening.established {
                *swept.established.entry(*backend_id).or_default() += n;
            }
            let mut counted = opening.counted.clone();
            for (backend_id, n) in &swept.counted {
                *counted.entry(*backend_id).or_default() += n;
            }
            active.correct(&counted);
            evictions.follow(&view.counters, &swept, total, capacity);
            shared.conntrack_entries.store(total, Ordering::Relaxed);
            let opening_total: u64 = opening.counts.values().sum();
            shared
                .half_open_entries
                .store(opening_total, Ordering::Relaxed);
            for (state, n) in opening.counts {
                *swept.counts.entry(state).or_default() += n;
            }
            *shared.conntrack_states.lock().unwrap() = swept.counts;
            let mut slept = Duration::ZERO;
            while slept < SWEEP_EVERY && !shared.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                slept += Duration::from_millis(100);
            }
        }
    });
}
