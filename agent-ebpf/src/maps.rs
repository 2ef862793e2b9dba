//! The maps the datapath shares with the agent. Sizes here are placeholders:
//! the agent sets the real ones from its config before loading.

use agent_common::{Backend, Flow, FlowKey, Prefilter, Service, ServiceKey, ServiceStats};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

use crate::packet::{FragmentKey, SYN_RECORD_SLOTS, Scratch, SynRecord};

/// (VIP, port, protocol) → service.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(1024, 0);

/// Backend id → address. Ids are the agent's, stable while the backend exists.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(4096, 0);

/// Backend id → the FIB result towards it (see `pipeline::translate`).
#[map]
pub static BACKEND_FIB: Array<agent_common::BackendFib> = Array::with_max_entries(4096, 0);

/// Maglev lookup tables of all services back to back, two halves per service
/// so the agent fills one while packets read the other. Mmapable: the agent
/// writes a table with memory stores, not a syscall per slot.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(1024, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Connection tracking: forward and reverse entries of every flow, once
/// its connection is established (TCP), and of UDP flows.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(262_144, 0);

/// TCP connects until the client acknowledges the backend's SYN-ACK, both
/// entries: a SYN flood (spoofed sources never complete the handshake)
/// fills and churns this table, never `CONNTRACK`'s established flows.
#[map]
pub static HALF_OPEN: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65_536, 0);

/// The ports of fragmented datagrams, by their first fragment (see
/// `parse`): later fragments carry no L4 header to route them by.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, crate::headers::Ports> =
    LruHashMap::with_max_entries(8192, 0);

/// Service id → this CPU's new flows in the current second (see `budget`).
#[map]
pub static FLOW_BUDGET: PerCpuArray<agent_common::FlowBudget> =
    PerCpuArray::with_max_entries(1024, 0);

/// Slot 0: this CPU's log records in the current second (window start,
/// count; see `budget`).
#[map]
pub static LOG_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the next SNAT port offset to hand out (see `conntrack::snat_seed`).
#[map]
pub static SNAT_CURSOR: Array<u32> = Array::with_max_entries(1, 0);

/// Bitmaps that let non-Sluice traffic through without a hash lookup.
#[map]
pub static PREFILTER: Array<Prefilter> = Array::with_max_entries(agent_common::prefilter::COUNT, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(1024, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(4096, 0);

/// Packets that left the fast path, by `agent_common::reason` code.
#[map]
pub static REASONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::reason::COUNT, 0);

/// Per-CPU working space of the pipeline (see `packet::Scratch`).
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the FIB cache generation (see `forward::to_next_hop`), bumped by the agent.
#[map]
pub static FIB_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Service id → failure policy (written by the agent).
#[map]
pub static SERVICE_POLICY: Array<agent_common::ServicePolicy> = Array::with_max_entries(1024, 0);

/// Service id → how many of its backends are ejected now (the kernel adds on
/// ejection, the agent recounts on readmission).
#[map]
pub static SERVICE_EJECTED: Array<u32> = Array::with_max_entries(1024, 0);

/// Backend id → consecutive failures and ejection.
#[map]
pub static BACKEND_HEALTH: Array<agent_common::BackendHealth> = Array::with_max_entries(4096, 0);

/// Backend id → connect latency histogram.
#[map]
pub static BACKEND_LATENCY: PerCpuArray<agent_common::LatencyHistogram> =
    PerCpuArray::with_max_entries(4096, 0);

/// Connection events for the agent (see `events`).
#[map]
pub static EVENTS: aya_ebpf::maps::RingBuf = aya_ebpf::maps::RingBuf::with_byte_size(1 << 18, 0);

/// Per-CPU event rate limit and counts.
#[map]
pub static EVENT_BUDGET: PerCpuArray<agent_common::EventBudget> =
    PerCpuArray::with_max_entries(1, 0);

/// Socket-level balancing: socket cookie → the VIP the socket asked for
/// and the backend it got, for getpeername and recvmsg.
#[map]
pub static SOCK_REVERSE: LruHashMap<u64, agent_common::SockReverse> =
    LruHashMap::with_max_entries(65_536, 0);

/// Socket-level balancing: TCP connects being followed for failure
/// accounting, by the kernel's socket address.
#[map]
pub static SOCK_CONNECTS: LruHashMap<u64, agent_common::SockConnect> =
    LruHashMap::with_max_entries(65_536, 0);

/// The client's SYN of recent connects of services that retry, in the
/// slot of its flow's hash (see `resyn`): what `resyn` rebuilds it
/// from. A direct-mapped array, not a hash map: a new connect pays a few
/// stores instead of an insert. Two connects whose hashes share a slot
/// overwrite each other, and the earlier one's refusal then waits for the
/// client's retransmission (the record names its flow). A power of two.
#[map]
pub static SYN_RECORDS: Array<SynRecord> = Array::with_max_entries(SYN_RECORD_SLOTS, 0);

/// The program that turns a held-back refusal into the client's SYN
/// towards the next backend (see `resyn`), tail-called by `sluice_xdp`
/// (slot 0). One array per program type: the kernel ties a program array
/// to the type of the first program that uses it.
#[map]
pub static RESYN_XDP: aya_ebpf::maps::ProgramArray =
    aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);

/// As `RESYN_XDP`, tail-called by `sluice_tc`.
#[map]
pub static RESYN_TC: aya_ebpf::maps::ProgramArray =
    aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);

/// Session affinity: (service, client address) → the client's backend and
/// when it last opened a connection (see `affinity`). Pinned: clients keep
/// their backends across an agent restart.
#[map]
pub static AFFINITY: LruHashMap<agent_common::AffinityKey, agent_common::AffinityEntry> =
    LruHashMap::with_max_entries(65_536, 0);

/// Backend id → its active flows of least-connections services, shared by
/// every CPU (atomic adds; see `least_conn`). Signed in effect: the
/// agent's correction may leave a word briefly below zero.
#[map]
pub static BACKEND_ACTIVE: Array<u64> = Array::with_max_entries(4096, 0);
/// The program that wraps a tunnelled DSR flow's packet in its outer
/// header (see `encap`), tail-called by `sluice_xdp` (slot 0).
#[map]
pub static ENCAP_XDP: aya_ebpf::maps::ProgramArray =
    aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);

/// As `ENCAP_XDP`, tail-called by `sluice_tc`.
#[map]
pub static ENCAP_TC: aya_ebpf::maps::ProgramArray =
    aya_ebpf::maps::ProgramArray::with_max_entries(1, 0);

/// The backend host's VIPs whose IPIP / IP6IP6 packets `sluice_decap`
/// unwraps (see `decap`); written by `sluice backend-decap`.
#[map]
pub static DECAP_VIPS: HashMap<agent_common::DecapVip, u32> = HashMap::with_max_entries(256, 0);

/// What `sluice_decap` did, by `agent_common::decap_count` (per CPU).
#[map]
pub static DECAP_COUNTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::decap_count::COUNT, 0);
/// The source ranges of services with `allowed_sources` (see
/// `agent_common::SourceRange`): one trie for all services, its keys led
/// by the service id. Sized by `agent_common::MAX_SOURCE_RANGES`.
#[map]
pub static SOURCE_RANGES: aya_ebpf::maps::LpmTrie<agent_common::SourceRange, u32> =
    aya_ebpf::maps::LpmTrie::with_max_entries(agent_common::MAX_SOURCE_RANGES, 0);

/// This CPU's scratch area (see `Scratch`).
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do
    // (see `Scratch`), so the exclusive reference is unique.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
