//! Types and functions shared by the kernel programs (agent-ebpf) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields and a
//! compile-time size check, so both sides agree on the layout byte for byte.
//! Addresses and ports are kept in network byte order exactly as they appear in
//! the packet: the kernel side then compares and copies without byte swaps.
#![no_std]

#[cfg(feature = "user")]
pub mod addr;
pub mod hash;
pub mod reason;
pub mod registry;
#[cfg(test)]
mod testgen;

/// Address family tags stored in keys (values of `AF_INET` / `AF_INET6`).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A Maglev slot that points at no backend (the service has none).
pub const NO_BACKEND: u32 = u32::MAX;

/// Key of the `SERVICES` map: what a client addresses.
///
/// An IPv4 address occupies `addr[0]`; the other words are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// The service forwards with full NAT: the backend sees `snat_addr` as source.
pub const SERVICE_F_SNAT: u32 = 1;
/// A refused or unanswered SYN is retried on another backend (policy flag).
pub const SERVICE_F_RETRY: u32 = 2;
/// Direct server return on the LB's segment: only the destination MAC
/// changes (towards the backend); IP and L4 headers stay as the client sent
/// them, and the backend, with the VIP on a loopback, answers the client.
pub const SERVICE_F_DSR_L2: u32 = 4;
/// Direct server return through a tunnel: the packet, unchanged, is
/// wrapped in an outer IPv4 (IPIP) or IPv6 (IP6IP6) header from
/// `snat_addr` to the backend's address.
pub const SERVICE_F_DSR_TUNNEL: u32 = 8;
/// Session affinity by client address: a client's new connections go to
/// the backend its `AFFINITY` entry names while the entry is younger than
/// `Service::affinity_timeout_s` and the backend takes new connections.
pub const SERVICE_F_AFFINITY: u32 = 16;
/// The backend of a new client is the one of two candidates (the Maglev
/// choice and a random slot of the table) with fewer active connections
/// for its weight (`BACKEND_ACTIVE`): per node, not consistent across nodes.
pub const SERVICE_F_LEAST_CONN: u32 = 32;
/// New flows are admitted only from sources in the service's entries of
/// `SOURCE_RANGES` (`allowed_sources`); others are dropped as
/// `reason::SOURCE_DENIED` before any state is created.
pub const SERVICE_F_SOURCE_RANGES: u32 = 64;
/// A new flow to a backend marked `BACKEND_F_REMOTE` is SNATed to
/// `snat_addr` (a NodePort entry's node address, with `external_traffic_policy:
/// cluster`: the backend is on another node, and its replies must come back
/// through this one); flows to other backends keep the client's address.
pub const SERVICE_F_SNAT_REMOTE: u32 = 128;

/// Whether a new flow of `service` to `backend` is SNATed: always with
/// `SERVICE_F_SNAT`, to remote backends only with `SERVICE_F_SNAT_REMOTE`.
/// Bit arithmetic, no branches: one outcome register for the verifier to
/// carry, not one path per way of getting there.
#[inline(always)]
pub fn snat_for(service: &Service, backend: &Backend) -> bool {
    const _: () = assert!(SERVICE_F_SNAT == 1 && BACKEND_F_REMOTE == 1);
    const _: () = assert!(SERVICE_F_SNAT_REMOTE == 1 << 7);
    let f = service.flags;
    (f | ((f >> 7) & backend.flags)) & 1 != 0
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service statistics.
    pub id: u32,
    /// First slot of this service's live Maglev table in `MAGLEV`.
    pub table_offset: u32,
    /// Number of slots (a prime).
    pub table_size: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// Source address for `snat` services, and for `SERVICE_F_SNAT_REMOTE`
    /// flows to remote backends (the NodePort entry's node address); for
    /// `SERVICE_F_DSR_TUNNEL` services the tunnel's outer source address.
    pub snat_addr: [u32; 4],
    /// With `SERVICE_F_AFFINITY`: how long a client's affinity entry lives
    /// after its last new connection, in seconds.
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 40);

/// Key of the `AFFINITY` map: one client of one service. The service id is
/// part of the key, so an id reused by a new service finds none of the old
/// one's entries valid (and the backend check refuses a reused backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// The client's address (an IPv4 address in `client[0]`).
    pub client: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

/// Value of the `AFFINITY` map: the backend a client's new connections go
/// to, and when the client last opened one (whole seconds of the coarse
/// monotonic clock, as `Flow::last_seen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub last_used_s: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 8);

/// How far a new flow's Maglev choice looks past ejected backends: this
/// many rehashes of its hash, then this many slots walked one by one (the
/// kernel's `select::pick`; `sluice explain` retraces it).
pub const MAGLEV_MAX_PICKS: u32 = 8;
pub const MAGLEV_MAX_WALK: u32 = 32;

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// The configured weight, and the owning service's id: a restarted
    /// agent reads them to adopt the backends of pinned maps as they were;
    /// the kernel reads the weight for least connections and the service
    /// id to tell whether a client's affinity entry still names a backend
    /// of that service (ids are reused).
    pub weight: u16,
    pub service_id: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 32);

/// The backend is on another node (or on no known node): with
/// `SERVICE_F_SNAT_REMOTE` its flows are SNATed.
pub const BACKEND_F_REMOTE: u32 = 1;

/// The data of a `SOURCE_RANGES` key, after the LPM trie's prefix length:
/// the whole key is `{prefixlen: u32, service_id: u32, family: u8, _pad:
/// [u8; 3], addr: [u32; 4]}` (the `Key<SourceRange>` of aya's LPM trie,
/// 28 bytes). The prefix length counts the service id, family and pad bits
/// too (`SOURCE_RANGE_FIXED_BITS` + the CIDR's prefix), so one trie holds
/// every service's ranges and a lookup matches only its own service and
/// family. The value is 1 (its presence is what counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; an IPv4 address occupies `addr[0]`.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SourceRange>() == 24);
/// The `SOURCE_RANGES` key's size with its prefix length in front.
pub const SOURCE_RANGE_KEY_SIZE: usize = 4 + core::mem::size_of::<SourceRange>();
const _: () = assert!(SOURCE_RANGE_KEY_SIZE == 28);
/// Bits of a `SOURCE_RANGES` key before the address: service id (32),
/// family (8) and pad (24), always matched whole.
pub const SOURCE_RANGE_FIXED_BITS: u32 = 64;
/// Capacity of `SOURCE_RANGES`: the source ranges of all services
/// together (`allowed_sources` entries, one per service entry it applies
/// to). The config and Kubernetes discovery refuse more.
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// Key of the `CONNTRACK` map: a packet's 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The flow's hash (`hash::flow_hash` of its 5-tuple): what Maglev
    /// picks the backend by.
    #[inline(always)]
    pub fn flow_hash(&self) -> u32 {
        hash::flow_hash(&self.src, &self.dst, self.sport, self.dport, self.proto)
    }
}

/// The entry translates backend → client packets (reverse NAT).
pub const FLOW_F_REVERSE: u32 = 1;
/// Forward entry of a TCP flow: the client sent a FIN.
pub const FLOW_F_FIN_CLIENT: u32 = 2;
/// Forward entry of a TCP flow: the backend sent a FIN.
pub const FLOW_F_FIN_BACKEND: u32 = 4;
/// Forward entry of a TCP flow: its SYN was checked whole (TTL, IPv4 header
/// and TCP checksums) before it was forwarded, so it reached the backend
/// intact and a retransmission past the connect timeout is the backend's
/// silence. A SYN too long to check (data in the SYN) leaves it unset: its
/// timeouts are not counted.
pub const FLOW_F_VERIFIED: u32 = 8;
/// Forward entry of a TCP flow: a failure of its current backend has been
/// counted; one connect attempt counts at most once.
pub const FLOW_F_FAILURE_COUNTED: u32 = 16;
/// Forward entry of a TCP flow of a service with session affinity: the
/// backend that answers its SYN becomes the client's affinity (after a
/// retry, the one that took the connection).
pub const FLOW_F_AFFINITY: u32 = 32;
/// Forward entry of a flow of a least-connections service: counted in its
/// backend's `BACKEND_ACTIVE` word, until it closes (then cleared, so it is
/// taken off once).
pub const FLOW_F_ACTIVE_COUNTED: u32 = 64;
/// Forward entry of a direct-server-return flow (`SERVICE_F_DSR_*`): the
/// packet keeps its addresses and ports; `new_dst` is the backend's address,
/// for the next hop only. It has no reverse entry (the replies bypass the
/// LB) and its TCP state stays `UNKNOWN`: no SYN-ACK, refusal or timeout
/// is ever seen for it.
pub const FLOW_F_DSR: u32 = 128;
/// With `FLOW_F_DSR`: the packet is wrapped in an outer IP header from
/// `new_src` (the service's `snat_addr`) to `new_dst` (the backend).
pub const FLOW_F_DSR_TUNNEL: u32 = 256;

/// Key of `DECAP_VIPS` (the backend host's decapsulation, `sluice_decap`):
/// a VIP whose encapsulated packets are unwrapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapVip {
    pub addr: [u32; 4],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<DecapVip>() == 20);

/// Slots of `DECAP_COUNTS` (per CPU): what `sluice_decap` did.
pub mod decap_count {
    /// Unwrapped and passed up to a configured VIP.
    pub const DECAPSULATED: u32 = 0;
    /// Encapsulated to a configured VIP but cut short or contradicting its
    /// lengths: dropped.
    pub const MALFORMED: u32 = 1;
    /// Encapsulated, but not to a configured VIP: passed untouched.
    pub const NOT_OURS: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// The FIB lookup result for a flow's next hop, kept in its conntrack entry:
/// a FIB lookup costs more than the rest of the fast path together.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FibCache {
    /// Egress interface; 0 = nothing cached.
    pub ifindex: u32,
    /// The FIB generation the lookup was made in; used only while the
    /// generation is the same.
    pub stamp: u32,
    /// The Ethernet addresses to write, destination then source, exactly as
    /// the first 12 bytes of the frame (three 32-bit words to store).
    pub macs: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<FibCache>() == 20);

/// Value of the `BACKEND_FIB` array: the FIB result towards one backend, and
/// which backend address it is for (ids are reused; a flow to a backend that
/// left may still hold the old id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFib {
    pub dst: [u32; 4],
    pub fib: FibCache,
}
const _: () = assert!(core::mem::size_of::<BackendFib>() == 36);

/// Value of the `CONNTRACK` map: how to rewrite the packets of one direction
/// of a flow. The forward entry (client → VIP) sends to the backend, from the
/// SNAT address with SNAT; the reverse entry (backend → client, or → SNAT
/// address) restores the VIP as source and the client as destination. Both
/// carry the rewrite itself, so an established flow needs no other map
/// lookup and keeps working after its backend left the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub new_src: [u32; 4],
    pub new_dst: [u32; 4],
    /// Network byte order.
    pub new_sport: u16,
    /// Network byte order.
    pub new_dport: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    pub fib: FibCache,
    /// `flow_state` (forward entries of TCP flows).
    pub state: u8,
    /// Backends tried after the first (retries).
    pub attempts: u8,
    pub _pad: u16,
    /// When a packet last used this entry, in whole seconds of the
    /// monotonic coarse clock (`bpf_ktime_get_coarse_ns`, `CLOCK_MONOTONIC_COARSE`):
    /// the agent's sweep expires flows idle longer than their state's timeout.
    pub last_seen: u32,
    /// The client's initial sequence number (network byte order), from its
    /// SYN: a backend's SYN-ACK or RST to that SYN acknowledges it plus one.
    pub syn_seq: u32,
    /// When the last SYN was forwarded (bpf_ktime_get_ns).
    pub syn_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 88);

/// Per-service counters (a per-CPU array indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub connections: u64,
    pub packets_to_backend: u64,
    pub bytes_to_backend: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    /// The backend answered a SYN with RST.
    pub failures_refused: u64,
    /// The client retransmitted its SYN after the connect timeout.
    pub failures_timeout: u64,
    /// An ICMP destination-unreachable came back for a flow.
    pub failures_unreachable: u64,
    /// Connects sent again to another backend.
    pub retries: u64,
    /// TCP connections that got their SYN-ACK.
    pub opened: u64,
    /// Opened TCP connections that saw a FIN or RST.
    pub closed: u64,
    /// Failures that would have ejected a backend but for max_ejected_percent.
    pub fail_open: u64,
    /// New flows dropped over the service's per-CPU budget (services only).
    pub over_budget: u64,
    /// ICMP errors, RSTs or SYN-ACKs about the service's flows that are no
    /// trustworthy answer to a SYN (from the client's side, a code that
    /// doesn't mean "down", not acknowledging the SYN, not a connect in
    /// progress, or a second one for the same attempt): counted neither for
    /// nor against a backend (services only).
    pub untrusted_signals: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 112);

/// Failure policy of a service (array by service id), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServicePolicy {
    /// Consecutive failures that eject a backend.
    pub consecutive_failures: u32,
    /// How many of the service's backends may be ejected at once.
    pub max_ejected: u32,
    /// A SYN retransmitted this long after the forwarded one is a timeout.
    pub connect_timeout_ns: u64,
    /// `SERVICE_F_*` bits (`SERVICE_F_RETRY`).
    pub flags: u32,
    /// Distinct client addresses whose connects must have failed in the
    /// current streak before an ejection (at most `FAILING_CLIENTS`): one
    /// client, hostile or misconfigured, can't eject a backend alone.
    pub min_distinct_clients: u32,
    /// New flows each CPU may create per second for the service (0: no
    /// limit); more are dropped (Katran's LRU-miss limit, per service).
    pub new_flows_per_second: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServicePolicy>() == 32);

/// Value of `FLOW_BUDGET` (per CPU, by service id): new flows created in
/// the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBudget {
    /// Start of the window (bpf_ktime_get_coarse_ns).
    pub window_ns: u64,
    pub used: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowBudget>() == 16);

/// Health of a backend (array by backend id). The kernel counts failures and
/// ejects; the agent readmits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHealth {
    /// Failed connects in a row; 64 bits for the kernel's atomic add.
    pub consecutive_failures: u64,
    /// A `BackendState`: not `Active` (0) while new connections must skip
    /// the backend (see `state`).
    pub ejected: u32,
    /// Times the kernel ejected it.
    pub ejections: u32,
    /// When it was last ejected (bpf_ktime_get_ns).
    pub ejected_ns: u64,
    /// Hashes of the client addresses whose connects failed in the current
    /// streak (0 = free slot), for `ServicePolicy::min_distinct_clients`.
    pub failing_clients: [u32; FAILING_CLIENTS],
}
const _: () = assert!(core::mem::size_of::<BackendHealth>() == 40);

/// How many distinct failing clients a backend's health remembers.
pub const FAILING_CLIENTS: usize = 4;

/// Value of `SOCK_REVERSE` (key: a socket's cookie): the backend the
/// socket-level balancer sent it to, and the VIP the application asked for,
/// which getpeername and recvmsg show it instead. Deleted when the socket is
/// released.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockReverse {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    /// Network byte order.
    pub vport: u16,
    /// Network byte order.
    pub backend_port: u16,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockReverse>() == 40);

/// Value of `SOCK_CONNECTS` (key: the kernel's socket address): a TCP
/// connect the socket-level balancer sent to a backend, followed through
/// its state changes for failure accounting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConnect {
    pub vip: [u32; 4],
    /// Network byte order.
    pub vport: u16,
    pub family: u8,
    /// 1 once established (then its close is counted).
    pub established: u8,
    pub service_id: u32,
    pub backend_id: u32,
    /// 1 once the backend answered the SYN with a reset (a refusal).
    pub reset: u32,
    /// When the connect was made (bpf_ktime_get_ns).
    pub since_ns: u64,
    /// Who connects, for `ServicePolicy::min_distinct_clients`: a tag of the
    /// socket's network namespace (one pod, or the host).
    pub client: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConnect>() == 48);

/// Version of the pinned maps' layout and meaning. Bump it with any change
/// to a type or map that pinned state carries from one build to the next:
/// an agent never adopts maps of another layout.
///
/// 4: `MAGLEV` is one pool of per-service tables sized by backend count
/// (was two `maglev.table_size` halves per service id).
/// 5: `Service` is 40 bytes (`affinity_timeout_s`); the `AFFINITY` and
/// `BACKEND_ACTIVE` maps; `SOURCE_RANGES` and the `source_denied` reason
/// (`REASONS` grows); `Backend` is 32 bytes (`flags`).
pub const MAP_LAYOUT: u32 = 5;

/// What `BackendHealth::ejected` says of a backend. Kept as a `u32` in the
/// shared struct (the kernel writes it; a value outside the enum must not be
/// undefined behaviour when read): convert with `BackendHealth::state`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Takes new connections.
    Active = 0,
    /// Ejected by the kernel after failures, until the agent readmits it.
    Ejected = 1,
    /// Gone from the config: the agent removed it.
    Removed = 2,
    /// Finishing its established connections (removed, or weight 0).
    Draining = 3,
}

impl BackendState {
    /// The state a raw `ejected` word holds (unknown values: ejected, the
    /// safe reading: no new connections).
    pub const fn from_word(word: u32) -> Self {
        match word {
            0 => Self::Active,
            2 => Self::Removed,
            3 => Self::Draining,
            _ => Self::Ejected,
        }
    }
}

impl BackendHealth {
    pub const fn state(&self) -> BackendState {
        BackendState::from_word(self.ejected)
    }

    pub fn set_state(&mut self, state: BackendState) {
        self.ejected = state as u32;
    }

    /// Starts the failure streak over (on readmission).
    pub fn restart_streak(&mut self) {
        self.consecutive_failures = 0;
        self.failing_clients = [0; FAILING_CLIENTS];
    }

    /// How many distinct clients failed in the current streak.
    pub fn distinct_failing_clients(&self) -> u32 {
        self.failing_clients.iter().filter(|&&c| c != 0).count() as u32
    }
}

/// Buckets of the connect latency histogram: bucket i counts latencies below
/// `LATENCY_BASE_NS << i` (8 µs up to about 4.2 s); slower ones count only in
/// `count`.
pub const LATENCY_BUCKETS: usize = 20;
pub const LATENCY_BASE_NS: u64 = 8_000;

/// Connect latency (SYN forwarded → SYN-ACK seen) of a backend (per-CPU
/// array by backend id). Buckets are not cumulative.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub count: u64,
    pub sum_ns: u64,
}
const _: () = assert!(core::mem::size_of::<LatencyHistogram>() == 176);

/// Kinds of connection events (`Event::kind`).
pub mod event_kind {
    /// A TCP connection got its SYN-ACK (duration: connect latency), or a new
    /// UDP flow started.
    pub const OPEN: u8 = 1;
    /// An established TCP connection saw a FIN or RST (duration: since its SYN).
    pub const CLOSE: u8 = 2;
    /// A connect failed (`reason`: `failure_reason`).
    pub const FAIL: u8 = 3;
    /// A connect was sent again to another backend (the event's backend).
    pub const RETRY: u8 = 4;
    /// The backend was ejected.
    pub const EJECT: u8 = 5;
}

/// `Event::reason` of a `FAIL` (and the `EJECT` it caused).
pub mod failure_reason {
    pub const REFUSED: u8 = 1;
    pub const TIMEOUT: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
}

/// A connection event, from the kernel through the `EVENTS` ring buffer.
/// Client and VIP are the flow as the client sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// bpf_ktime_get_ns.
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub client: [u32; 4],
    pub vip: [u32; 4],
    /// Network byte order.
    pub client_port: u16,
    /// Network byte order.
    pub vip_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);

/// Events each CPU may emit per second, and the burst it may save up: a
/// flood of connections must not swamp the agent.
pub const EVENTS_PER_SECOND: u64 = 5_000;
pub const EVENT_BURST: u64 = 1_000;

/// Per-CPU event budget (token bucket, in events × 10^9).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub tokens: u64,
    pub last_ns: u64,
    /// Events sent.
    pub sent: u64,
    /// Events dropped: over budget or ring buffer full.
    pub dropped: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 32);

/// TCP state of a flow, kept in its forward entry.
pub mod flow_state {
    /// Not tracked (UDP, or a TCP flow first seen mid-stream).
    pub const UNKNOWN: u8 = 0;
    /// SYN forwarded, no answer yet.
    pub const SYN_SENT: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    /// Closed: FINs from both sides, a RST, or an unretried refusal. Kept
    /// for the short TIME_WAIT timeout; its SNAT port may be taken at once.
    pub const CLOSED: u8 = 3;
    /// The backend refused; the client's retransmitted SYN goes elsewhere.
    pub const REFUSED: u8 = 4;
    /// One side sent a FIN (the connection counts as closed from here).
    pub const CLOSING: u8 = 5;
}

impl core::ops::AddAssign<&ServiceStats> for ServiceStats {
    /// Sums the per-CPU copies of a slot.
    fn add_assign(&mut self, o: &ServiceStats) {
        self.connections += o.connections;
        self.packets_to_backend += o.packets_to_backend;
        self.bytes_to_backend += o.bytes_to_backend;
        self.packets_to_client += o.packets_to_client;
        self.bytes_to_client += o.bytes_to_client;
        self.failures_refused += o.failures_refused;
        self.failures_timeout += o.failures_timeout;
        self.failures_unreachable += o.failures_unreachable;
        self.retries += o.retries;
        self.opened += o.opened;
        self.closed += o.closed;
        self.fail_open += o.fail_open;
        self.over_budget += o.over_budget;
        self.untrusted_signals += o.untrusted_signals;
    }
}

/// Bits in each prefilter bitmap (a power of two).
pub const PREFILTER_BITS: u32 = 1 << 16;
/// The prefilter bitmap as stored in one array slot.
pub const PREFILTER_WORDS: usize = (PREFILTER_BITS / 64) as usize;

/// Slots of the `PREFILTER` array. Each is a bitmap over
/// [`hash::prefilter_bit`]: a clear bit proves the packet is not ours, so
/// traffic that isn't for Sluice costs one array read, not a hash lookup.
pub mod prefilter {
    /// (VIP, port, protocol) of every service.
    pub const SERVICE: u32 = 0;
    /// (address, port, protocol) of every backend: replies to reverse-NAT.
    pub const BACKEND: u32 = 1;
    /// VIP addresses alone, for packets without ports (fragments, extension headers).
    pub const SERVICE_ADDR: u32 = 2;
    /// Backend addresses alone, likewise.
    pub const BACKEND_ADDR: u32 = 3;
    pub const COUNT: u32 = 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Prefilter {
    pub words: [u64; PREFILTER_WORDS],
}
const _: () = assert!(core::mem::size_of::<Prefilter>() == 8192);

impl Default for Prefilter {
    fn default() -> Self {
        Self {
            words: [0; PREFILTER_WORDS],
        }
    }
}

impl Prefilter {
    pub fn set(&mut self, bit: u32) {
        let bit = bit & (PREFILTER_BITS - 1);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// Adds `(addr, port, proto)` (port in network byte order; 0 and 0 for
    /// the address alone), as the agent builds the bitmaps.
    pub fn insert(&mut self, addr: &[u32; 4], port: u16, proto: u8) {
        self.set(hash::prefilter_bit(addr, port, proto));
    }

    /// Whether `(addr, port, proto)` may have been inserted: false means
    /// certainly not. The kernel's test.
    #[inline(always)]
    pub fn may_contain(&self, addr: &[u32; 4], port: u16, proto: u8) -> bool {
        // prefilter_bit is below PREFILTER_BITS: no mask needed.
        let bit = hash::prefilter_bit(addr, port, proto);
        self.words[(bit >> 6) as usize] & (1 << (bit & 63)) != 0
    }
}

/// Source ports handed out to SNAT flows, in turn (see `conntrack::snat_seed` in agent-ebpf): a
/// port comes round again only after 64,512 new flows, longer at 1,000 new
/// connections a second than the backend's TIME_WAIT (60 s) for the last
/// connection on it, which would refuse the new SYN (its timestamps are not
/// the old connection's) and cost the client a retransmission.
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 65535;
/// How many ports the kernel tries before giving up on a new SNAT flow.
pub const SNAT_PORT_ATTEMPTS: u32 = 16;

/// The frame header `bench_restore` writes back before every benchmark run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchFrame {
    pub words: [u64; 8],
    /// If not zero, a per-run counter is written into the IPv4 client
    /// address and port, so every run is a new flow.
    pub vary: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 72);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers, with every
    // padding byte an explicit field, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FibCache {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::BackendFib {}
    unsafe impl aya::Pod for super::ServicePolicy {}
    unsafe impl aya::Pod for super::BackendHealth {}
    unsafe impl aya::Pod for super::LatencyHistogram {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::Prefilter {}
    unsafe impl aya::Pod for super::BenchFrame {}
    unsafe impl aya::Pod for super::SockReverse {}
    unsafe impl aya::Pod for super::SockConnect {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::DecapVip {}
    unsafe impl aya::Pod for super::SourceRange {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::BTreeSet, vec::Vec};

    use super::*;
    use crate::testgen::{Gen, v4_nth};

    fn set_bits(filter: &Prefilter) -> u32 {
        filter.words.iter().map(|w| w.count_ones()).sum()
    }

    #[test]
    fn set_marks_one_bit_and_wraps_out_of_range_bits() {
        for bit in [0, 1, 63, 64, 65, 4097, PREFILTER_BITS - 1] {
            let mut filter = Prefilter::default();
            filter.set(bit);
            filter.set(bit);
            assert_eq!(set_bits(&filter), 1, "bit {bit}");
            assert_eq!(
                filter.words[(bit / 64) as usize],
                1 << (bit % 64),
                "bit {bit}"
            );
        }
        // Masked to the bitmap, never out of it.
        let (mut wrapped, mut direct) = (Prefilter::default(), Prefilter::default());
        wrapped.set(PREFILTER_BITS + 5);
        direct.set(5);
        assert_eq!(wrapped.words, direct.words);
    }

    /// `n` distinct (address, port, protocol) from `next`.
    fn members(
        n: usize,
        mut next: impl FnMut() -> ([u32; 4], u16, u8),
    ) -> Vec<([u32; 4], u16, u8)> {
        let mut set = BTreeSet::new();
        while set.len() < n {
            set.insert(next());
        }
        set.into_iter().collect()
    }

    fn build(members: &[([u32; 4], u16, u8)]) -> Prefilter {
        let mut filter = Prefilter::default();
        for (addr, port, proto) in members {
            filter.insert(addr, *port, *proto);
        }
        filter
    }

    /// Share of `probes` (none a member) the filter lets through.
    fn false_positives(filter: &Prefilter, probes: &[([u32; 4], u16, u8)]) -> f64 {
        let hits = probes
            .iter()
            .filter(|(a, p, pr)| filter.may_contain(a, *p, *pr))
            .count();
        hits as f64 / probes.len() as f64
    }

    /// 2,000 services (VIP, port, protocol), any mix: about 3% of the bits.
    fn services(g: &mut Gen) -> Vec<([u32; 4], u16, u8)> {
        members(2000, || {
            let proto = if g.one_in(4) { PROTO_UDP } else { PROTO_TCP };
            (g.addr(), g.u16(), proto)
        })
    }

    #[test]
    fn every_member_passes_the_prefilter() {
        let mut g = Gen::new(10);
        let services = services(&mut g);
        let (ported, addrs) = (
            build(&services),
            build(
                &services
                    .iter()
                    .map(|&(a, _, _)| (a, 0, 0))
                    .collect::<Vec<_>>(),
            ),
        );
        for (addr, port, proto) in &services {
            assert!(
                ported.may_contain(addr, *port, *proto),
                "{addr:?}:{port}/{proto}"
            );
            assert!(addrs.may_contain(addr, 0, 0), "{addr:?}");
        }
        // The layout an operator writes: one VIP, many ports; many VIPs in a row.
        let structured = members(2000, || {
            let i = g.u32() % 4000;
            (
                v4_nth(i / 2),
                (80 + (i % 2) as u16 * 363).to_be(),
                PROTO_TCP,
            )
        });
        let filter = build(&structured);
        assert!(
            structured
                .iter()
                .all(|(a, p, pr)| filter.may_contain(a, *p, *pr))
        );
    }

    #[test]
    fn false_positives_stay_near_the_fill() {
        // One hash, one bit: a non-member passes with the probability that
        // its bit is set, the bitmap's fill (2,000 members: 1 - e^(-2000/65536),
        // about 3%). Bound: under 4%, and within a point of the fill, for
        // 100,000 random non-members.
        let mut g = Gen::new(11);
        let services = services(&mut g);
        let filter = build(&services);
        let fill = set_bits(&filter) as f64 / PREFILTER_BITS as f64;
        assert!(fill < 0.035, "fill {fill:.4}");
        let known: BTreeSet<_> = services.iter().copied().collect();
        let probes = members(100_000, || {
            let proto = if g.one_in(2) { PROTO_UDP } else { PROTO_TCP };
            (g.addr(), g.u16(), proto)
        });
        let probes: Vec<_> = probes.into_iter().filter(|m| !known.contains(m)).collect();
        let fp = false_positives(&filter, &probes);
        assert!(
            fp < 0.04 && (fp - fill).abs() < 0.01,
            "false positives {fp:.4}, fill {fill:.4}"
        );

        // The address-only bitmap, probed with other addresses.
        let addrs: Vec<_> = services.iter().map(|&(a, _, _)| (a, 0, 0)).collect();
        let filter = build(&addrs);
        let fill = set_bits(&filter) as f64 / PREFILTER_BITS as f64;
        let known: BTreeSet<_> = addrs.iter().copied().collect();
        let probes = members(100_000, || (g.addr(), 0, 0));
        let probes: Vec<_> = probes.into_iter().filter(|m| !known.contains(m)).collect();
        let fp = false_positives(&filter, &probes);
        assert!(
            fp < 0.04 && (fp - fill).abs() < 0.01,
            "false positives {fp:.4}, fill {fill:.4}"
        );
    }

    #[test]
    fn backends_in_a_row_let_few_neighbours_through() {
        // The backend bitmap's usual content: 1,000 backends 10.0.0.0 upwards
        // on port 8080 (1.5% of the bits). The traffic it must turn away comes
        // from their neighbours: the next addresses on 8080, the same
        // addresses on other ports (metrics, ssh, ...). These structured
        // probes do worse than random ones (the port and the address are
        // XORed before mixing), so the bound is twice the fill.
        let backends: Vec<_> = (0..1000)
            .map(|i| (v4_nth(i), 8080u16.to_be(), PROTO_TCP))
            .collect();
        let filter = build(&backends);
        let fill = set_bits(&filter) as f64 / PREFILTER_BITS as f64;
        let next_addresses: Vec<_> = (1000..101_000)
            .map(|i| (v4_nth(i), 8080u16.to_be(), PROTO_TCP))
            .collect();
        let other_ports: Vec<_> = (0..1000)
            .flat_map(|i| {
                [22u16, 80, 443, 8081, 8443, 9090, 9100].map(|p| (v4_nth(i), p.to_be(), PROTO_TCP))
            })
            .collect();
        let other_proto: Vec<_> = (0..1000)
            .map(|i| (v4_nth(i), 8080u16.to_be(), PROTO_UDP))
            .collect();
        for (what, probes) in [
            ("next addresses", &next_addresses[..]),
            ("other ports", &other_ports[..]),
            ("UDP", &other_proto[..]),
        ] {
            let fp = false_positives(&filter, probes);
            assert!(
                fp <= 2.0 * fill,
                "{what}: false positives {fp:.4}, fill {fill:.4}"
            );
        }
    }
}
