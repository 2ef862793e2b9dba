//! Every map and program the kernel object defines, in one table: the agent
//! takes maps by these names, sizes them, pins them, and attaches programs
//! by these names. (The eBPF side names a map by its static's identifier; a
//! test of the agent checks the object against this table.)

/// What decides a map's capacity at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// As the object declares it.
    Fixed,
    /// `conntrack.max_entries`.
    Conntrack,
    /// `conntrack.half_open_max_entries`.
    HalfOpen,
    /// `limits.max_services`: one slot per service id.
    Services,
    /// `limits.max_backends`: one slot per backend id.
    Backends,
    /// The pool of Maglev slots every service's table is allocated from,
    /// sized by `limits.max_services`, `limits.max_backends` and
    /// `maglev.table_size` (the agent's `reconcile::slots::pool_slots`).
    MaglevSlots,
    /// `conntrack.affinity_max_entries`.
    Affinity,
}

/// One map of the kernel object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    /// Pinned with the datapath, so its contents outlive an agent restart.
    /// Per-CPU scratch space and the log ring are per program and start
    /// fresh.
    pub pinned: bool,
    pub sizing: Sizing,
}

/// The maps' names, for the agent's lookups.
pub mod map {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const BACKEND_FIB: &str = "BACKEND_FIB";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const HALF_OPEN: &str = "HALF_OPEN";
    pub const FLOW_BUDGET: &str = "FLOW_BUDGET";
    pub const LOG_BUDGET: &str = "LOG_BUDGET";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const SNAT_CURSOR: &str = "SNAT_CURSOR";
    pub const PREFILTER: &str = "PREFILTER";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const FIB_GENERATION: &str = "FIB_GENERATION";
    pub const SERVICE_POLICY: &str = "SERVICE_POLICY";
    pub const SERVICE_EJECTED: &str = "SERVICE_EJECTED";
    pub const BACKEND_HEALTH: &str = "BACKEND_HEALTH";
    pub const BACKEND_LATENCY: &str = "BACKEND_LATENCY";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const SOCK_REVERSE: &str = "SOCK_REVERSE";
    pub const SOCK_CONNECTS: &str = "SOCK_CONNECTS";
    pub const SYN_RECORDS: &str = "SYN_RECORDS";
    pub const RESYN_XDP: &str = "RESYN_XDP";
    pub const RESYN_TC: &str = "RESYN_TC";
    pub const AFFINITY: &str = "AFFINITY";
    pub const BACKEND_ACTIVE: &str = "BACKEND_ACTIVE";
    pub const ENCAP_XDP: &str = "ENCAP_XDP";
    pub const ENCAP_TC: &str = "ENCAP_TC";
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const DECAP_COUNTS: &str = "DECAP_COUNTS";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
}

const fn def(name: &'static str, pinned: bool, sizing: Sizing) -> MapDef {
    MapDef {
        name,
        pinned,
        sizing,
    }
}

/// Every map of the datapath's object (the benchmark's programs aside).
pub const MAPS: &[MapDef] = &[
    def(map::SERVICES, true, Sizing::Services),
    def(map::BACKENDS, true, Sizing::Backends),
    def(map::BACKEND_FIB, true, Sizing::Backends),
    def(map::MAGLEV, true, Sizing::MaglevSlots),
    def(map::CONNTRACK, true, Sizing::Conntrack),
    def(map::HALF_OPEN, true, Sizing::HalfOpen),
    def(map::FLOW_BUDGET, false, Sizing::Services),
    def(map::LOG_BUDGET, false, Sizing::Fixed),
    def(map::FRAGMENTS, false, Sizing::Fixed),
    def(map::SNAT_CURSOR, false, Sizing::Fixed),
    def(map::PREFILTER, true, Sizing::Fixed),
    def(map::SERVICE_STATS, true, Sizing::Services),
    def(map::BACKEND_STATS, true, Sizing::Backends),
    def(map::REASONS, true, Sizing::Fixed),
    def(map::SCRATCH, false, Sizing::Fixed),
    def(map::FIB_GENERATION, true, Sizing::Fixed),
    def(map::SERVICE_POLICY, true, Sizing::Services),
    def(map::SERVICE_EJECTED, true, Sizing::Services),
    def(map::BACKEND_HEALTH, true, Sizing::Backends),
    def(map::BACKEND_LATENCY, true, Sizing::Backends),
    def(map::EVENTS, true, Sizing::Fixed),
    def(map::EVENT_BUDGET, true, Sizing::Fixed),
    def(map::SOCK_REVERSE, true, Sizing::Fixed),
    def(map::SOCK_CONNECTS, true, Sizing::Fixed),
    // Not pinned: after a restart a half-open connect's refusal waits for
    // the client's retransmission, as without them.
    def(map::SYN_RECORDS, false, Sizing::Fixed),
    def(map::RESYN_XDP, false, Sizing::Fixed),
    def(map::RESYN_TC, false, Sizing::Fixed),
    // Pinned: a client keeps its backend across an agent restart.
    def(map::AFFINITY, true, Sizing::Affinity),
    // Pinned: it counts the pinned flows.
    def(map::BACKEND_ACTIVE, true, Sizing::Backends),
    def(map::ENCAP_XDP, false, Sizing::Fixed),
    def(map::ENCAP_TC, false, Sizing::Fixed),
    // The backend host's decapsulation (`sluice backend-decap`), which loads
    // the same object but attaches only `sluice_decap`.
    def(map::DECAP_VIPS, false, Sizing::Fixed),
    def(map::DECAP_COUNTS, false, Sizing::Fixed),
    // Pinned like SERVICES, whose ids its keys carry.
    def(map::SOURCE_RANGES, true, Sizing::Fixed),
];

/// The programs' names (their entry functions in agent-ebpf/src/main.rs).
pub mod program {
    pub const XDP: &str = "sluice_xdp";
    pub const TC: &str = "sluice_tc";
    /// Tail-called by the XDP and TC programs, from slot 0 of the maps
    /// `RESYN_XDP` and `RESYN_TC`.
    pub const RESYN_XDP: &str = "sluice_resyn_xdp";
    pub const RESYN_TC: &str = "sluice_resyn_tc";
    /// Tail-called by the XDP and TC programs, from slot 0 of the maps
    /// `ENCAP_XDP` and `ENCAP_TC`: wraps a tunnelled DSR flow's packet.
    pub const ENCAP_XDP: &str = "sluice_encap_xdp";
    pub const ENCAP_TC: &str = "sluice_encap_tc";
    /// The backend host's TC ingress program (`sluice backend-decap`).
    pub const DECAP: &str = "sluice_decap";
    /// Its TC egress companion: the backend's SYN-ACKs from a VIP get the
    /// MSS the tunnel leaves room for.
    pub const DECAP_MSS: &str = "sluice_decap_mss";
    /// The cgroup sock_addr programs of socket-level balancing.
    pub const SOCKET: [&str; 8] = [
        "sluice_connect4",
        "sluice_connect6",
        "sluice_sendmsg4",
        "sluice_sendmsg6",
        "sluice_recvmsg4",
        "sluice_recvmsg6",
        "sluice_getpeername4",
        "sluice_getpeername6",
    ];
    pub const SOCK_STATE: &str = "sluice_sock_state";
    pub const TCP_RESET: &str = "sluice_tcp_reset";
    pub const SOCK_RELEASE: &str = "sluice_sock_release";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_listed_once() {
        for (i, a) in MAPS.iter().enumerate() {
            assert!(
                MAPS[i + 1..].iter().all(|b| b.name != a.name),
                "{} listed twice",
                a.name
            );
        }
    }
}
