//! Why a packet left the fast path. The kernel counts each reason in a per-CPU
//! array; the agent exports drops as `sluice_drops_total{reason}` and passes as
//! `sluice_passed_total{reason}`.

/// A reason and what the datapath does with such a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason {
    pub name: &'static str,
    pub dropped: bool,
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $id:ident = $idx:literal, $name:literal, $dropped:literal;)*) => {
        $( $(#[$doc])* pub const $id: u32 = $idx; )*
        /// Every reason, indexed by its code.
        pub const ALL: &[Reason] = &[$(Reason { name: $name, dropped: $dropped }),*];
    };
}

reasons! {
    /// The frame ends before the IP addresses: nothing says it is ours. Passed.
    SHORT_FRAME = 0, "short_frame", false;
    /// VLAN-tagged frame; Sluice handles untagged frames (attach it to the VLAN
    /// interface instead). Passed untouched.
    VLAN_TAGGED = 1, "vlan_tagged", false;
    /// For a VIP or from a backend, but a header is cut short. Dropped.
    TRUNCATED = 2, "truncated", true;
    /// For a VIP or from a backend, with header lengths that contradict the frame. Dropped.
    BAD_LENGTH = 3, "bad_length", true;
    /// A later IP fragment (no ports) whose first fragment wasn't seen, to a
    /// VIP's or from a backend's address: nothing proves it is Sluice's, so
    /// it is passed untouched (the kernel reassembles or drops it).
    FRAGMENT = 4, "fragment", false;
    /// IPv6 extension headers Sluice doesn't parse (AH, ESP, mobility, more
    /// than four) before the transport header, to a VIP's or from a backend's
    /// address: passed untouched.
    IPV6_EXTENSION = 5, "ipv6_extension", false;
    /// The service has no backend to choose. Dropped.
    NO_BACKEND = 6, "no_backend", true;
    /// The conntrack map refused a new entry. Dropped.
    CONNTRACK_FULL = 7, "conntrack_full", true;
    /// Every SNAT source port tried was taken. Dropped.
    SNAT_PORTS_EXHAUSTED = 8, "snat_ports_exhausted", true;
    /// The FIB has no neighbour entry yet: the kernel resolves it and forwards. Passed.
    FIB_NO_NEIGHBOUR = 9, "fib_no_neighbour", false;
    /// The packet is too big for the egress MTU: the kernel answers the client. Passed.
    FIB_FRAG_NEEDED = 10, "fib_frag_needed", false;
    /// The FIB has no usable route (unreachable, blackhole, prohibited, forwarding off). Dropped.
    FIB_NO_ROUTE = 11, "fib_no_route", true;
    /// TTL or hop limit would expire: the kernel sends the ICMP error. Passed.
    TTL_EXCEEDED = 12, "ttl_exceeded", false;
    /// A backend's RST to a SYN, held back: the client's retransmitted SYN
    /// goes to another backend instead of the client seeing the refusal.
    RST_HELD_FOR_RETRY = 13, "rst_held_for_retry", true;
    /// dnat: another flow already uses this (backend, client, ports) reply
    /// tuple (same client port towards two VIPs sharing a backend). Dropped.
    REPLY_CONFLICT = 14, "reply_conflict", true;
    /// Headers that end or contradict themselves before the ports (IPv4
    /// header length below 5, a cut IPv6 extension header or ports), to a
    /// VIP's or from a backend's address: with no exact lookup to say the
    /// packet is Sluice's, it is passed untouched.
    MALFORMED = 15, "malformed", false;
    /// A TCP SYN to a VIP whose IPv4 header or TCP checksum is wrong: the
    /// backend would drop it, so it creates no state and is dropped here.
    BAD_CHECKSUM = 16, "bad_checksum", true;
    /// A new flow over its service's per-CPU budget of new flows per second
    /// (`new_flows_per_second`): a flood must not exhaust the flow tables
    /// or the CPU. Dropped.
    NEW_FLOW_BUDGET = 17, "new_flow_budget", true;
    /// A TCP RST of no tracked flow to an SNAT service: which port its flow
    /// had is gone, so it is passed untouched. (With DNAT it goes to the
    /// Maglev choice, untracked: a RST creates no state.)
    UNTRACKED_RST = 18, "untracked_rst", false;
    /// A new flow to a service with `allowed_sources` from a source in
    /// none of its ranges: dropped before any state is created.
    SOURCE_DENIED = 19, "source_denied", true;
}

pub const COUNT: u32 = ALL.len() as u32;

/// Bit `code` is set when packets of that reason are dropped (for the kernel,
/// which must not index `ALL` with a value it can't bound).
pub const DROPPED_MASK: u32 = {
    let mut mask = 0;
    let mut i = 0;
    while i < ALL.len() {
        if ALL[i].dropped {
            mask |= 1 << i;
        }
        i += 1;
    }
    mask
};
const _: () = assert!(ALL.len() <= 32);
