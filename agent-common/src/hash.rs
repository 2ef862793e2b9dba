//! Hashes the kernel computes per packet and the agent must reproduce.
//!
//! Fixed seeds: every node computes the same values, so every node picks the
//! same backend for the same 5-tuple (ECMP in front of several nodes is safe).

const SEED: u32 = 0x5_1ce;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    // One MurmurHash3 round: cheap, no loops, good enough avalanche for slots.
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a connection's 5-tuple (addresses and ports as on the wire).
#[inline(always)]
pub const fn flow_hash(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, (sport as u32) << 16 | dport as u32);
    h = mix(h, proto as u32);
    finish(h)
}

/// The `attempt`-th alternative to a flow hash, for skipping ejected backends.
#[inline(always)]
pub const fn rehash(h: u32, attempt: u32) -> u32 {
    finish(mix(h, attempt))
}

/// Bit of a prefilter bitmap for an (address, port, protocol); pass port 0
/// and protocol 0 for the address-only bitmaps.
#[inline(always)]
pub const fn prefilter_bit(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    // Cheaper than flow_hash on purpose: this runs for every packet.
    let x = addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(14) ^ addr[3].rotate_left(21);
    let x = x ^ ((port as u32) << 8 | proto as u32).wrapping_mul(0x9e37_79b1);
    finish(x) & (crate::PREFILTER_BITS - 1)
}
