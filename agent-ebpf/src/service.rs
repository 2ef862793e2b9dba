//! Stage 2: is the packet for a service? The prefilter's bitmaps let other
//! traffic through without a hash lookup; then the exact (VIP, port,
//! protocol) lookup.

use agent_common::{
    FAMILY_V4, SOURCE_RANGE_FIXED_BITS, Service, ServiceKey, SourceRange, prefilter,
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{PREFILTER, SERVICES, SOURCE_RANGES},
    packet::{Action, copy_addr},
    stats::count,
};

/// Whether `(addr, port, proto)` may be in the prefilter set `slot`
/// (`prefilter::*`): false means certainly not.
#[inline(always)]
pub fn prefilter_hit(slot: u32, addr: &[u32; 4], port: u16, proto: u8) -> bool {
    PREFILTER
        .get(slot)
        .is_some_and(|bitmap| bitmap.may_contain(addr, port, proto))
}

/// A packet Sluice can't parse far enough to look it up exactly. It passes
/// untouched: a prefilter hit (the address may be a VIP's or a backend's)
/// only decides whether it is counted, never whether it is dropped. Drops
/// come after an exact service or conntrack lookup (`validate`).
#[inline(always)]
pub fn unhandled(src: &[u32; 4], dst: &[u32; 4], code: u32) -> Action {
    if prefilter_hit(prefilter::SERVICE_ADDR, dst, 0, 0)
        || prefilter_hit(prefilter::BACKEND_ADDR, src, 0, 0)
    {
        count(code);
    }
    Action::Pass
}

/// The service at `(addr, port, proto)`, found through `key` (part of the
/// scratch area: the key is too big for the stack).
#[inline(always)]
pub fn lookup(
    key: &mut ServiceKey,
    addr: &[u32; 4],
    port: u16,
    proto: u8,
    family: u8,
) -> Option<Service> {
    copy_addr(&mut key.addr, addr);
    key.port = port;
    key.proto = proto;
    key.family = family;
    // SAFETY: copied out at once; the agent replaces, never edits, entries.
    unsafe { SERVICES.get(key) }.copied()
}

/// Whether `src` (of `family`) is in one of the `allowed_sources` ranges of
/// the service `service_id`: one longest-prefix lookup of the whole
/// address, led by the service id and family (see
/// `agent_common::SourceRange`), through `key` (the scratch area's on the
/// packet path).
#[inline(always)]
pub fn source_allowed(
    key: &mut Key<SourceRange>,
    service_id: u32,
    src: &[u32; 4],
    family: u8,
) -> bool {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    key.prefix_len = SOURCE_RANGE_FIXED_BITS + bits;
    key.data.service_id = service_id;
    key.data.family = family;
    key.data._pad = [0; 3];
    // Word by word: the key is packed (no references into it).
    key.data.addr[0] = src[0];
    key.data.addr[1] = src[1];
    key.data.addr[2] = src[2];
    key.data.addr[3] = src[3];
    SOURCE_RANGES.get(&*key).is_some()
}
