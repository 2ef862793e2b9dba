//! The packet as the pipeline sees it: the context the entry point hands
//! over, where its headers are, bounds-checked access to them, and the
//! per-CPU scratch area the stages work in. The leaf every stage builds on.

use core::{ffi::c_void, mem};

use agent_common::{Flow, FlowKey, ServiceKey, SourceRange};
use aya_ebpf::bindings::bpf_fib_lookup;
use aya_ebpf::maps::lpm_trie::Key;
use network_types::eth::EthHdr;

/// What the entry point should do with the packet.
pub enum Action {
    Pass,
    Drop,
    /// Send back out of the interface it came in on.
    Tx,
    /// Send out of another interface.
    Redirect(u32),
}

/// The packet as the entry point hands it over.
pub struct Ctx {
    pub data: usize,
    pub data_end: usize,
    /// The whole packet's length. For TC only the headers need to be in the
    /// linear part (`data..data_end`); the rest may be paged.
    pub len: usize,
    pub ifindex: u32,
    /// The program's context (`xdp_md` or `__sk_buff`) for helpers.
    pub raw: *mut c_void,
    /// TC: `raw` is an skb, whose L4 checksum may be partial (local senders,
    /// veth, containers) and is fixed by the skb checksum helper. A constant
    /// per entry point, so each program keeps only its own branch.
    pub skb: bool,
}

impl aya_ebpf::EbpfContext for Ctx {
    fn as_ptr(&self) -> *mut c_void {
        self.raw
    }
}

/// Where an IP packet carrying TCP or UDP keeps its headers. Its 5-tuple is
/// in the per-CPU scratch area (`Scratch::key`), not on the stack.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// End of the IP datagram according to its own length field.
    pub ip_end: usize,
    /// `Fragment::*`: whether the datagram is a fragment, and which.
    pub fragment: u8,
    /// The IP identification of a fragment (IPv4's 16 bits, IPv6's 32).
    pub id: u32,
}

/// Where a packet stands in its datagram. Only the first fragment carries
/// the ports; later ones follow it by the ports `FRAGMENTS` remembers for
/// (source, destination, identification, protocol), as Cilium does.
pub mod fragment {
    /// Not a fragment.
    pub const NONE: u8 = 0;
    /// Offset 0, more to come: has the L4 header.
    pub const FIRST: u8 = 1;
    /// No L4 header: addresses are rewritten, nothing else.
    pub const LATER: u8 = 2;
}

/// Key of `FRAGMENTS`.
#[repr(C)]
pub struct FragmentKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Big values the pipeline builds, kept in a per-CPU map: the BPF stack (512
/// bytes over all frames) can't hold them all. XDP and TC programs run in
/// softirq context and never nest on one CPU, so one area per CPU suffices.
#[repr(C)]
pub struct Scratch {
    /// The packet's 5-tuple, as it arrived.
    pub key: FlowKey,
    pub service_key: ServiceKey,
    pub reverse_key: FlowKey,
    pub forward: Flow,
    pub reverse: Flow,
    /// The forward key of a flow whose SNAT port may be taken over.
    pub old_key: FlowKey,
    pub fragment_key: FragmentKey,
    /// Where parsing left off (see `parse::settle`).
    pub parsed: [u32; 4],
    pub fib: bpf_fib_lookup,
    /// Headers copied out to be summed (see `integrity`).
    pub words: [u32; 32],
    /// Of the packet being handled, when it is a client's SYN: the reason
    /// it must not go on (`NO_REFUSAL` if it may), whether it was checked
    /// whole (1) and its sequence number (network byte order). Kept here,
    /// not in registers, so that the verifier walks the rest of the
    /// pipeline once, not once for each outcome of the check.
    pub syn_refusal: u32,
    pub syn_verified: u32,
    pub syn_seq: u32,
    /// Set with a refusal held back for a retry: the flow's forward key
    /// and where the RST's IP and TCP headers are, for `resyn`, which the
    /// entry point tail-calls to turn the RST into the client's SYN
    /// towards the next backend. `resyn` is 1 until the entry point has
    /// read it (`resyn::requested`).
    pub resyn_key: FlowKey,
    pub resyn_l3: u32,
    pub resyn_l4: u32,
    pub resyn: u32,
    /// The key of a client's session affinity entry (see `affinity`).
    pub affinity_key: agent_common::AffinityKey,
    /// A new flow's backend id, attempt and `FLOW_F_AFFINITY` bit (see
    /// `pipeline::choose`).
    pub chosen: [u32; 3],
    /// The client's source as a `SOURCE_RANGES` key (see
    /// `service::source_allowed`).
    pub source_key: Key<SourceRange>,
    /// Set by `pipeline::translate` for a tunnelled DSR packet (see `encap`).
    pub encap: EncapRequest,
}

/// A tunnelled DSR packet's wrapping, asked of `encap` (tail-called by the
/// entry point) once its next hop is known and its Ethernet addresses are
/// written: the outer addresses, the egress, and where the inner headers are.
#[repr(C)]
pub struct EncapRequest {
    pub outer_src: [u32; 4],
    pub outer_dst: [u32; 4],
    /// The egress interface; `tx` is 1 when it is the one the packet came in on.
    pub ifindex: u32,
    pub tx: u32,
    /// Offsets of the inner IP and transport headers.
    pub l3: u32,
    pub l4: u32,
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    /// 1 until the entry point has read it (`encap::requested`).
    pub requested: u32,
}

/// Slots of `SYN_RECORDS` (a power of two). A record is needed from a SYN
/// until its answer (a round trip to the backend), and it is lost when
/// another connect's hash takes its slot meanwhile: about rate × round
/// trip / slots of refusals (1% at 10,000 connects a second and 1 ms) then
/// wait for the client's retransmission. Few enough slots to stay in the
/// CPU's cache: at 16,384 the random slot of each new flow missed it and
/// cost about 200 ns a new flow (`bench datapath`), at 1,024 about 40.
pub const SYN_RECORD_SLOTS: u32 = 1_024;

/// Words of `SynRecord::tcp`: a TCP header with the most options (60 bytes).
pub const SYN_TCP_WORDS: usize = 15;

/// A client's SYN as it reached Sluice, kept (in `SYN_RECORDS`) while its
/// connect is half-open, so that the backend's refusal can be turned into
/// the very same SYN towards the next backend (see `resyn`): same
/// sequence number, window and options (MSS, window scale, SACK,
/// timestamps), which the backend's SYN-ACK must match.
#[repr(C)]
pub struct SynRecord {
    /// The hash of the flow's forward key (client → VIP): with the ports
    /// and the sequence number in `tcp`, whose SYN this is.
    pub hash: u32,
    /// The TCP segment as the client sent it (header, options, and data
    /// when there is room), zero-padded.
    pub tcp: [u32; SYN_TCP_WORDS],
    /// IPv4: the identification and fragment word; IPv6: the version,
    /// traffic class and flow label word.
    pub ip_word: u32,
    /// Bytes of `tcp` in use (20..=60).
    pub tcp_len: u8,
    /// IPv4's type of service (IPv6's traffic class is in `ip_word`).
    pub tos: u8,
    /// TTL or hop limit as it arrived; forwarding decrements it.
    pub ttl: u8,
    /// Refusals of this connect already turned into a SYN to another
    /// backend (see `resyn::MAX_RESENDS`).
    pub resends: u8,
}
const _: () = assert!(mem::size_of::<SynRecord>() == 72);

/// `Scratch::syn_refusal` of a SYN that may go on.
pub const NO_REFUSAL: u32 = u32::MAX;

pub const ETH_LEN: usize = mem::size_of::<EthHdr>();

/// Copies an address word by word. A plain array copy between two places
/// LLVM can't prove apart becomes a memmove call: a byte loop in BPF code.
#[inline(always)]
pub fn copy_addr(dst: &mut [u32; 4], src: &[u32; 4]) {
    let (a, b, c, d) = (src[0], src[1], src[2], src[3]);
    // SAFETY: writes through a valid &mut; volatile only to keep LLVM from
    // fusing the four stores back into a memmove.
    unsafe {
        core::ptr::write_volatile(&mut dst[0], a);
        core::ptr::write_volatile(&mut dst[1], b);
        core::ptr::write_volatile(&mut dst[2], c);
        core::ptr::write_volatile(&mut dst[3], d);
    }
}

/// Copies a flow key field by field (a struct copy becomes a memcpy call).
#[inline(always)]
pub fn copy_key(to: &mut FlowKey, from: &FlowKey) {
    copy_addr(&mut to.src, &from.src);
    copy_addr(&mut to.dst, &from.dst);
    to.sport = from.sport;
    to.dport = from.dport;
    to.proto = from.proto;
    to.family = from.family;
    to._pad = 0;
}

/// A pointer to a `T` at `offset` in the packet, if it lies inside.
///
/// Don't ask for a single byte at a variable offset: LLVM turns
/// `start + 1 > end` into `start >= end`, from which the verifier learns
/// nothing about the byte. Read a wider word instead.
#[inline(always)]
pub fn ptr_at<T>(ctx: &Ctx, offset: usize) -> Option<*mut T> {
    let start = ctx.data + offset;
    if start + mem::size_of::<T>() > ctx.data_end {
        return None;
    }
    Some(start as *mut T)
}
